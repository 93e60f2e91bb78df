//! Range checks of the training options, before anything is loaded or allocated from them. Each
//! message names the command-line option, so a bad value is blamed, not the training that it
//! would have spoiled ("training diverged … lower --lr" when `--alpha` was NaN).

use anyhow::Result;

use crate::bad_option;
use crate::error::BadOption;

use super::{RunOptions, TrainOptions};

/// The largest minibatch (questions per step).
pub const MAX_BATCH_SIZE: usize = 4096;

/// Errors unless `value` is finite and inside `range` (each bound open or closed as named).
fn check_range(option: &str, value: f64, min: f64, min_open: bool, max: f64) -> Result<()> {
    let low_ok = if min_open { value > min } else { value >= min };
    if !(value.is_finite() && low_ok && value <= max) {
        let low = if min_open { "(" } else { "[" };
        if max == f64::MAX {
            let what = if min_open { "above" } else { "at least" };
            bad_option!(
                "{option} {value} is out of range: it must be a finite number {what} {min}"
            );
        }
        bad_option!(
            "{option} {value} is out of range: it must be a finite number in {low}{min}, {max}]"
        );
    }
    Ok(())
}

fn at_least_one(option: &str, value: u64) -> Result<()> {
    if value == 0 {
        bad_option!("{option} 0: it must be at least 1");
    }
    Ok(())
}

impl TrainOptions {
    /// Checks every option; the first bad one is named.
    pub fn validate(&self) -> Result<()> {
        if self.targets.is_empty() {
            bad_option!("--targets is empty: name at least one module to adapt (e.g. q_proj)");
        }
        self.spec()
            .validate()
            .map_err(|e| BadOption(e.to_string()))?;
        at_least_one("--epochs", self.epochs as u64)?;
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            bad_option!(
                "--batch-size {}: it must be 1 to {MAX_BATCH_SIZE}",
                self.batch_size
            );
        }
        check_range("--lr", self.lr, 0.0, true, 1.0)?;
        check_range("warmup", self.warmup, 0.0, false, 1.0)?;
        check_range("min_lr", self.min_lr, 0.0, false, 1.0)?;
        check_range("--grad-clip", self.grad_clip, 0.0, true, f64::MAX)?;
        check_range("--prior-std", self.prior_std, 0.0, true, f64::MAX)?;
        check_range("--init-b-std", self.init_b_std, 0.0, false, f64::MAX)?;
        check_range("--repulsion", self.repulsion, 0.0, false, f64::MAX)?;
        Ok(())
    }
}

impl RunOptions {
    /// Checks the step counts (0 would silently mean "every step" or "no step at all").
    pub fn validate(&self) -> Result<()> {
        at_least_one("--eval-every", self.eval_every)?;
        at_least_one("--checkpoint-every", self.checkpoint_every)?;
        if let Some(m) = self.max_steps {
            at_least_one("--max-steps", m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(opts: &TrainOptions) -> String {
        format!("{:#}", opts.validate().unwrap_err())
    }

    #[test]
    fn the_defaults_pass() {
        TrainOptions::llava_defaults().validate().unwrap();
    }

    #[test]
    fn each_bad_value_names_its_option() {
        let ok = TrainOptions::llava_defaults();
        let cases: Vec<(TrainOptions, &str)> = vec![
            (
                TrainOptions {
                    grad_clip: -1.0,
                    ..ok.clone()
                },
                "--grad-clip",
            ),
            (
                TrainOptions {
                    grad_clip: 0.0,
                    ..ok.clone()
                },
                "--grad-clip",
            ),
            (
                TrainOptions {
                    alpha: f64::NAN,
                    ..ok.clone()
                },
                "--alpha",
            ),
            (
                TrainOptions {
                    alpha: 0.0,
                    ..ok.clone()
                },
                "--alpha",
            ),
            (
                TrainOptions {
                    prior_std: 0.0,
                    ..ok.clone()
                },
                "--prior-std",
            ),
            (
                TrainOptions {
                    init_b_std: f64::NAN,
                    ..ok.clone()
                },
                "--init-b-std",
            ),
            (
                TrainOptions {
                    init_b_std: -0.1,
                    ..ok.clone()
                },
                "--init-b-std",
            ),
            (
                TrainOptions {
                    repulsion: -1.0,
                    ..ok.clone()
                },
                "--repulsion",
            ),
            (
                TrainOptions {
                    repulsion: f64::NAN,
                    ..ok.clone()
                },
                "--repulsion",
            ),
            (
                TrainOptions {
                    lr: f64::INFINITY,
                    ..ok.clone()
                },
                "--lr",
            ),
            (
                TrainOptions {
                    lr: 0.0,
                    ..ok.clone()
                },
                "--lr",
            ),
            (
                TrainOptions {
                    particles: 0,
                    ..ok.clone()
                },
                "--particles",
            ),
            (
                TrainOptions {
                    particles: 100_000,
                    ..ok.clone()
                },
                "--particles",
            ),
            (
                TrainOptions {
                    rank: 0,
                    ..ok.clone()
                },
                "--rank",
            ),
            (
                TrainOptions {
                    rank: 1 << 20,
                    ..ok.clone()
                },
                "--rank",
            ),
            (
                TrainOptions {
                    epochs: 0,
                    ..ok.clone()
                },
                "--epochs",
            ),
            (
                TrainOptions {
                    batch_size: 0,
                    ..ok.clone()
                },
                "--batch-size",
            ),
            (
                TrainOptions {
                    targets: vec![],
                    ..ok.clone()
                },
                "--targets",
            ),
        ];
        for (opts, option) in cases {
            let e = err(&opts);
            assert!(e.contains(option), "{option}: {e}");
        }
        // init_b_std 0 is PEFT's zero init, a valid choice.
        TrainOptions {
            init_b_std: 0.0,
            ..ok
        }
        .validate()
        .unwrap();
    }
}
