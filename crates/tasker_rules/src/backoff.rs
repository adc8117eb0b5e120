//! Retry backoff for failed steps (Rails' `BackoffCalculator`, §4.5 of the reference):
//! a server-requested Retry-After wins, capped at 300 s; otherwise 1, 2, 4, 8, 16, 32 s for
//! attempts 1–6, then attempt², capped at 300 s, with ±10 % jitter (never below 1 s).

/// Longest backoff, in seconds, whatever the attempt or Retry-After.
pub const MAX_BACKOFF_SECONDS: i64 = 300;
/// Backoff of attempts 1 to 6, in seconds.
pub const DEFAULT_BACKOFF_SECONDS: [i64; 6] = [1, 2, 4, 8, 16, 32];
/// Jitter amplitude, as a fraction of the backoff.
pub const JITTER_FRACTION: f64 = 0.1;

/// The exponential backoff of the `attempt`-th execution (1-based), before jitter and cap.
pub fn base_backoff_seconds(attempt: i32) -> i64 {
    match attempt {
        i32::MIN..=0 => DEFAULT_BACKOFF_SECONDS[0],
        1..=6 => DEFAULT_BACKOFF_SECONDS[(attempt - 1) as usize],
        _ => (attempt as i64).saturating_mul(attempt as i64),
    }
}

/// A deterministic source of jitter: the same seed gives the same jitter.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seconds to wait before the next attempt after the `attempt`-th execution failed.
/// `retry_after` (seconds the remote side asked for) wins, capped at 300; otherwise the
/// exponential table, capped at 300, then shifted by a jitter in ±10 % drawn from
/// `jitter_seed` (no jitter when `None`), never below 1.
pub fn backoff_seconds(attempt: i32, retry_after: Option<i64>, jitter_seed: Option<u64>) -> i64 {
    if let Some(seconds) = retry_after {
        return seconds.clamp(0, MAX_BACKOFF_SECONDS);
    }
    let base = base_backoff_seconds(attempt).min(MAX_BACKOFF_SECONDS);
    let Some(seed) = jitter_seed else {
        return base.max(1);
    };
    let amplitude = (base as f64 * JITTER_FRACTION).round() as i64;
    if amplitude == 0 {
        return base.max(1);
    }
    let span = (2 * amplitude + 1) as u64;
    let jitter = (splitmix64(seed) % span) as i64 - amplitude;
    (base + jitter).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_then_square_then_cap() {
        let got: Vec<i64> = (1..=20).map(|a| backoff_seconds(a, None, None)).collect();
        assert_eq!(
            got,
            vec![
                1, 2, 4, 8, 16, 32, 49, 64, 81, 100, 121, 144, 169, 196, 225, 256, 289, 300, 300,
                300
            ]
        );
        assert_eq!(backoff_seconds(i32::MAX, None, None), 300);
        assert_eq!(backoff_seconds(0, None, None), 1);
    }

    #[test]
    fn retry_after_wins_and_is_capped() {
        assert_eq!(backoff_seconds(1, Some(7), Some(42)), 7);
        assert_eq!(backoff_seconds(9, Some(3600), None), 300);
        assert_eq!(backoff_seconds(9, Some(0), None), 0);
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_is_seedable() {
        for attempt in 1..=30 {
            let base = backoff_seconds(attempt, None, None);
            let amp = (base as f64 * 0.1).round() as i64;
            for seed in 0..200u64 {
                let j = backoff_seconds(attempt, None, Some(seed));
                assert!(
                    (base - amp..=base + amp).contains(&j),
                    "attempt {attempt}: {j} vs {base}±{amp}"
                );
                assert!(j >= 1);
                assert_eq!(j, backoff_seconds(attempt, None, Some(seed)), "same seed, same jitter");
            }
        }
        // the jitter actually varies
        let values: std::collections::HashSet<i64> =
            (0..100u64).map(|s| backoff_seconds(10, None, Some(s))).collect();
        assert!(values.len() > 10);
    }
}
