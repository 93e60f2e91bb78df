//! Accuracy, calibration and selective-prediction metrics (design §6).
