//! What a request costs: token counts × per-million-token prices, in USDC atomic units, never a float.
//!
//! The cost is rounded UP to the next atomic unit (1e-6 USDC) over the whole request, so the operator is never
//! paid less than the configured price and a client is never charged more than one atomic unit above it.

use crate::usdc::Usdc;

/// A model's prices per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    pub input_per_mtok: Usdc,
    pub output_per_mtok: Usdc,
}

impl Prices {
    /// The exact cost of `prompt` input and `completion` output tokens.
    pub fn cost(&self, prompt: u64, completion: u64) -> Usdc {
        let numerator = u128::from(prompt) * self.input_per_mtok.atomic().max(0) as u128
            + u128::from(completion) * self.output_per_mtok.atomic().max(0) as u128;
        let atomic = numerator.div_ceil(1_000_000);
        Usdc(i64::try_from(atomic).unwrap_or(i64::MAX))
    }

    /// The most output tokens `budget` pays for after `prompt` input tokens (0 if it does not cover the prompt).
    pub fn max_output_tokens(&self, budget: Usdc, prompt: u64) -> u64 {
        let input = self.cost(prompt, 0).atomic();
        let left = budget.atomic().saturating_sub(input);
        let per_mtok = self.output_per_mtok.atomic();
        if left <= 0 {
            return 0;
        }
        if per_mtok <= 0 {
            return u64::MAX;
        }
        // Largest n with ceil(n × price / 1e6) ≤ left  ⇔  n × price ≤ left × 1e6.
        ((left as u128 * 1_000_000) / per_mtok as u128).min(u128::from(u64::MAX)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices(i: &str, o: &str) -> Prices {
        Prices {
            input_per_mtok: i.parse().unwrap(),
            output_per_mtok: o.parse().unwrap(),
        }
    }

    #[test]
    fn exact_to_the_atomic_unit_rounded_up() {
        let p = prices("0.60", "2.50");
        // 1,000,000 input tokens cost exactly 0.60.
        assert_eq!(p.cost(1_000_000, 0), "0.60".parse().unwrap());
        // 10 input + 20 output = (10 × 600000 + 20 × 2500000) / 1e6 = 56 atomic exactly.
        assert_eq!(p.cost(10, 20), Usdc(56));
        // 1 input token = 0.6 atomic → rounded up to 1.
        assert_eq!(p.cost(1, 0), Usdc(1));
        assert_eq!(p.cost(0, 0), Usdc(0));
    }

    #[test]
    fn budget_to_tokens_is_the_inverse() {
        let p = prices("0.60", "2.50");
        let budget = Usdc(1_000);
        let n = p.max_output_tokens(budget, 100);
        assert!(p.cost(100, n) <= budget);
        assert!(p.cost(100, n + 1) > budget);
        assert_eq!(p.max_output_tokens(Usdc(10), 1_000_000), 0);
    }
}
