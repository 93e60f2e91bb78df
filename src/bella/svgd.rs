//! Stein variational gradient descent over the particles (design §4).
