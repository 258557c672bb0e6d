//! `taming.lr_scheduler.LambdaWarmUpCosineScheduler`: a linear warm-up from `lr_start` to
//! `lr_max`, then a cosine decay to `lr_min` at `max_decay_steps`. `GumbelVQ` uses it (as its
//! `temperature_scheduler_config`) to anneal the Gumbel-softmax temperature. Mirrors
//! `taming/lr_scheduler.py`.

use serde_json::Value;

use crate::config::TargetConfig;
use crate::{Error, Result};

/// The target string the reference's configs use for this schedule.
pub const LAMBDA_WARM_UP_COSINE: &str = "taming.lr_scheduler.LambdaWarmUpCosineScheduler";

/// `LambdaWarmUpCosineScheduler(warm_up_steps, lr_min, lr_max, lr_start, max_decay_steps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmUpCosine {
    pub warm_up_steps: f64,
    pub lr_min: f64,
    pub lr_max: f64,
    pub lr_start: f64,
    pub max_decay_steps: f64,
}

impl WarmUpCosine {
    /// From a `{target, params}` block; `origin` names it in errors (e.g.
    /// `model.params.temperature_scheduler_config`).
    pub fn from_target(cfg: &TargetConfig, origin: &str) -> Result<Self> {
        if cfg.target != LAMBDA_WARM_UP_COSINE {
            return Err(Error::Config {
                origin: format!("{origin}.target"),
                msg: format!(
                    "unsupported schedule `{}` (supported: {LAMBDA_WARM_UP_COSINE})",
                    cfg.target
                ),
            });
        }
        let known = [
            "warm_up_steps",
            "lr_min",
            "lr_max",
            "lr_start",
            "max_decay_steps",
            "verbosity_interval",
        ];
        if let Value::Object(m) = &cfg.params {
            if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
                return Err(Error::Config {
                    origin: format!("{origin}.params.{k}"),
                    msg: format!("unknown parameter (known: {})", known.join(", ")),
                });
            }
        }
        let num = |k: &str| -> Result<f64> {
            cfg.params
                .get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| Error::Config {
                    origin: format!("{origin}.params.{k}"),
                    msg: "missing or not a number".into(),
                })
        };
        let s = Self {
            warm_up_steps: num("warm_up_steps")?,
            lr_min: num("lr_min")?,
            lr_max: num("lr_max")?,
            lr_start: num("lr_start")?,
            max_decay_steps: num("max_decay_steps")?,
        };
        if s.max_decay_steps <= s.warm_up_steps {
            return Err(Error::Config {
                origin: format!("{origin}.params.max_decay_steps"),
                msg: format!(
                    "{} must be larger than warm_up_steps ({})",
                    s.max_decay_steps, s.warm_up_steps
                ),
            });
        }
        Ok(s)
    }

    /// The value at step `n` (the reference's `schedule(n)`).
    pub fn at(&self, n: u64) -> f64 {
        let n = n as f64;
        if n < self.warm_up_steps {
            (self.lr_max - self.lr_start) / self.warm_up_steps * n + self.lr_start
        } else {
            let t =
                ((n - self.warm_up_steps) / (self.max_decay_steps - self.warm_up_steps)).min(1.0);
            self.lr_min
                + 0.5 * (self.lr_max - self.lr_min) * (1.0 + (t * std::f64::consts::PI).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(params: Value) -> TargetConfig {
        TargetConfig {
            target: LAMBDA_WARM_UP_COSINE.into(),
            params,
        }
    }

    #[test]
    fn warm_up_then_cosine_to_the_floor() -> anyhow::Result<()> {
        // the reference's GumbelVQ schedule shape: temperature 0.9 annealed to 1e-6
        let s = WarmUpCosine::from_target(
            &cfg(
                serde_json::json!({"warm_up_steps": 10, "max_decay_steps": 110, "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1.0e-6}),
            ),
            "t",
        )?;
        assert_eq!(s.at(0), 0.9);
        assert_eq!(s.at(10), 0.9);
        let mid = 1e-6 + 0.5 * (0.9 - 1e-6);
        assert!((s.at(60) - mid).abs() < 1e-12);
        assert!((s.at(110) - 1e-6).abs() < 1e-15 && (s.at(10_000) - 1e-6).abs() < 1e-15);
        // linear warm-up from lr_start to lr_max
        let w = WarmUpCosine {
            warm_up_steps: 4.0,
            lr_min: 0.0,
            lr_max: 1.0,
            lr_start: 0.2,
            max_decay_steps: 8.0,
        };
        assert!((w.at(2) - 0.6).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn bad_schedules_are_named() {
        let e = WarmUpCosine::from_target(
            &cfg(serde_json::json!({"warm_up_steps": 1})),
            "model.params.temperature_scheduler_config",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("model.params.temperature_scheduler_config.params.lr_min"),
            "{e}"
        );
        let e = WarmUpCosine::from_target(
            &TargetConfig {
                target: "x.Y".into(),
                params: serde_json::json!({}),
            },
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x.Y"), "{e}");
    }
}
