//! The cost model behind the adaptive choices: verification time against tree size, and
//! moving averages of acceptance rates and draft costs.

/// Verification time as a line in the tree size, `c(n) = c̄ + slope·(n − n̄)`, fitted by least
/// squares over the recent passes (older ones fade, one percent a pass): passes of any size
/// inform the estimate at every size, so a size seldom or never verified (a pass without
/// drafts, when drafts are usual) is not guessed from its nearest neighbour alone.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CostFit {
    w: f64,
    n: f64,
    nn: f64,
    c: f64,
    nc: f64,
}

impl CostFit {
    /// Until the sizes seen vary: each node beyond the first costs this fraction of a
    /// one-node pass (what `examples/verify_cost` measures for small trees on a 2-core Zen 4).
    pub(super) const PRIOR_SLOPE: f64 = 0.25;

    pub(super) fn add(&mut self, n: f64, c: f64) {
        let d = 0.99;
        self.w = d * self.w + 1.0;
        self.n = d * self.n + n;
        self.nn = d * self.nn + n * n;
        self.c = d * self.c + c;
        self.nc = d * self.nc + n * c;
    }

    pub(super) fn estimate(&self, n: f64) -> Option<f64> {
        if self.w == 0.0 {
            return None;
        }
        let (mn, mc) = (self.n / self.w, self.c / self.w);
        let var = self.nn / self.w - mn * mn;
        let one = mc / (1.0 + Self::PRIOR_SLOPE * (mn - 1.0));
        let slope = if var > 0.5 { (self.nc / self.w - mn * mc) / var } else { Self::PRIOR_SLOPE * one };
        // A pass over more nodes never costs less, nor more than a whole pass per node.
        let slope = slope.clamp(0.02 * one, one);
        Some((mc + slope * (n - mn)).max(0.2 * mc))
    }
}

/// Per-position acceptance of a drafted chain: `accepted` successes out of `accepted` trials,
/// plus one more when the walk stopped inside the chain (`accepted < drafted`).
pub(super) fn per_position(accepted: usize, drafted: usize) -> f64 {
    accepted as f64 / (accepted + usize::from(accepted < drafted)) as f64
}

/// Exponential moving average that starts at its first sample.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Ema(pub(super) Option<f64>);
impl Ema {
    pub(super) fn add(&mut self, x: f64, w: f64) {
        self.0 = Some(self.0.map_or(x, |m| m + w * (x - m)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_fit_recovers_a_line_and_falls_back_to_the_prior() {
        let mut f = CostFit::default();
        assert_eq!(f.estimate(1.0), None);
        for k in 0..200 {
            let n = [2.0, 3.0, 5.0, 8.0][k % 4];
            f.add(n, 5.0 + 1.25 * n);
        }
        assert!((f.estimate(1.0).unwrap() - 6.25).abs() < 1e-6);
        assert!((f.estimate(16.0).unwrap() - 25.0).abs() < 1e-6);
        // One size only: the slope is the prior's share of a one-node pass.
        let mut g = CostFit::default();
        for _ in 0..10 {
            g.add(3.0, 6.0);
        }
        let one = 6.0 / (1.0 + 2.0 * CostFit::PRIOR_SLOPE);
        assert!((g.estimate(1.0).unwrap() - one).abs() < 1e-9);
        assert!((g.estimate(4.0).unwrap() - (6.0 + CostFit::PRIOR_SLOPE * one)).abs() < 1e-9);
    }
}
