//! Choosing an endpoint: power of two choices over peak-EWMA latency, with
//! outlier ejection. Pure logic: every method takes the current time, so the
//! balancer is tested with made-up clocks and no I/O.

use std::time::{Duration, Instant};

/// The balancer's knobs, with linkerd2-proxy's and Envoy's defaults.
#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// How fast old latency observations fade (peak-EWMA decay).
    pub decay: Duration,
    /// Consecutive failures that eject an endpoint.
    pub eject_after: u32,
    /// First ejection; each further one doubles it, up to `max_ejection`.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            decay: Duration::from_secs(10),
            eject_after: 5,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
        }
    }
}

/// What the balancer keeps about one endpoint.
#[derive(Debug, Clone)]
pub struct EndpointStats {
    /// Peak-EWMA latency estimate, in nanoseconds.
    cost_ns: f64,
    last_update: Option<Instant>,
    /// Requests sent and not yet answered.
    pending: u32,
    consecutive_failures: u32,
    /// How many times in a row it was ejected (reset by a success after return).
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// How one request to an endpoint ended, as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that says the endpoint works (any status but 5xx).
    Success,
    /// No connection, a reset, a timeout, or a 5xx.
    Failure,
    /// The caller went away before the answer (a client that
    /// disconnected, an HTTP/2 stream reset): says nothing of whether the
    /// endpoint works, and of its latency only that it is at least this.
    Abandoned,
}

/// Peak-EWMA P2C over a set of endpoints, indexed 0..n.
#[derive(Debug, Clone)]
pub struct Balancer {
    config: BalanceConfig,
    endpoints: Vec<EndpointStats>,
}

impl Balancer {
    pub fn new(config: BalanceConfig, endpoints: usize) -> Balancer {
        // An endpoint never measured costs nothing, so it is tried at once
        // and measured: with a pessimistic default, a new instance could
        // lose every comparison against fast ones and never get traffic.
        let fresh = EndpointStats {
            cost_ns: 0.0,
            last_update: None,
            pending: 0,
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
        };
        Balancer {
            endpoints: vec![fresh; endpoints],
            config,
        }
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Picks an endpoint for a request: two distinct candidates drawn with
    /// `random` (which must return values in `0..bound`), the cheaper one
    /// wins. Ejected endpoints and those in `exclude` (already tried for this
    /// request) are not candidates while any other is; when every endpoint is
    /// ejected, all are candidates again (Envoy's panic mode): sending to a
    /// maybe-broken endpoint beats refusing every request. `None` only when
    /// there are no endpoints.
    pub fn pick(
        &self,
        now: Instant,
        exclude: &[usize],
        mut random: impl FnMut(usize) -> usize,
    ) -> Option<usize> {
        let available: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| !self.is_ejected(i, now) && !exclude.contains(&i))
            .collect();
        let candidates: Vec<usize> = if !available.is_empty() {
            available
        } else {
            let untried: Vec<usize> = (0..self.endpoints.len())
                .filter(|i| !exclude.contains(i))
                .collect();
            if untried.is_empty() {
                (0..self.endpoints.len()).collect()
            } else {
                untried
            }
        };
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let a = random(n);
                let mut b = random(n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (candidates[a], candidates[b]);
                Some(if self.cost(b, now) < self.cost(a, now) {
                    b
                } else {
                    a
                })
            }
        }
    }

    /// The load estimate P2C compares: latency estimate × (pending + 1).
    pub fn cost(&self, i: usize, now: Instant) -> f64 {
        let e = &self.endpoints[i];
        decayed(e.cost_ns, e.last_update, now, self.config.decay) * f64::from(e.pending + 1)
    }

    /// Requests started on `i` and not yet finished.
    #[cfg(test)]
    pub(crate) fn pending(&self, i: usize) -> u32 {
        self.endpoints[i].pending
    }

    /// A request was sent to `i`.
    pub fn start(&mut self, i: usize) {
        self.endpoints[i].pending += 1;
    }

    /// The request to `i` sent with [`start`](Self::start) ended after `rtt`.
    pub fn finish(&mut self, i: usize, now: Instant, rtt: Duration, outcome: Outcome) {
        let config = self.config.clone();
        let e = &mut self.endpoints[i];
        e.pending = e.pending.saturating_sub(1);
        let rtt_ns = rtt.as_nanos() as f64;
        let current = decayed(e.cost_ns, e.last_update, now, config.decay);
        // Peak: a slower observation is taken at once; faster ones fade in
        // (an abandoned request's time is only a lower bound).
        e.cost_ns = if rtt_ns > current {
            rtt_ns
        } else if outcome == Outcome::Abandoned {
            current
        } else {
            let w = weight(e.last_update, now, config.decay);
            current * w + rtt_ns * (1.0 - w)
        };
        e.last_update = Some(now);
        match outcome {
            Outcome::Abandoned => {}
            Outcome::Success => {
                e.consecutive_failures = 0;
                if e.ejected_until.is_some_and(|t| t <= now) {
                    e.ejected_until = None;
                    e.ejections = 0;
                }
            }
            Outcome::Failure => {
                e.consecutive_failures += 1;
                let ejected = e.ejected_until.is_some_and(|t| t > now);
                if e.consecutive_failures >= config.eject_after && !ejected {
                    let factor = 2u32.saturating_pow(e.ejections.min(16));
                    let period = config
                        .base_ejection
                        .saturating_mul(factor)
                        .min(config.max_ejection);
                    e.ejected_until = Some(now + period);
                    e.ejections += 1;
                    // On return it gets a fresh count, but one failure
                    // before a success ejects it again, for longer.
                    e.consecutive_failures = config.eject_after.saturating_sub(1);
                }
            }
        }
    }

    pub fn is_ejected(&self, i: usize, now: Instant) -> bool {
        self.endpoints[i].ejected_until.is_some_and(|t| t > now)
    }
}

/// How much of the old estimate survives from `last` to `now`.
fn weight(last: Option<Instant>, now: Instant, decay: Duration) -> f64 {
    match last {
        None => 0.0,
        Some(last) => {
            let elapsed = now.saturating_duration_since(last).as_nanos() as f64;
            (-elapsed / decay.as_nanos().max(1) as f64).exp()
        }
    }
}

/// An estimate fades toward zero while nothing is measured, so an endpoint
/// that was slow long ago gets tried again.
fn decayed(cost_ns: f64, last: Option<Instant>, now: Instant, decay: Duration) -> f64 {
    match last {
        None => cost_ns,
        Some(_) => cost_ns * weight(last, now, decay),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A deterministic stand-in for the random draws.
    fn sequence() -> impl FnMut(usize) -> usize {
        let mut state = 7usize;
        move |bound| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (state >> 8) % bound
        }
    }

    fn serve(b: &mut Balancer, i: usize, now: Instant, rtt: Duration, outcome: Outcome) {
        b.start(i);
        b.finish(i, now, rtt, outcome);
    }

    #[test]
    fn the_faster_endpoint_gets_most_requests() {
        let t0 = Instant::now();
        let mut b = Balancer::new(BalanceConfig::default(), 3);
        let latency = [ms(50), ms(5), ms(50)];
        let mut counts = [0usize; 3];
        let mut random = sequence();
        for step in 0..3000u64 {
            let now = t0 + ms(step);
            let i = b.pick(now, &[], &mut random).unwrap();
            counts[i] += 1;
            serve(&mut b, i, now, latency[i], Outcome::Success);
        }
        assert!(counts[1] > 2 * (counts[0] + counts[2]), "{counts:?}");
        // P2C never starves the others entirely: they are still measured.
        assert!(counts[0] > 0 && counts[2] > 0, "{counts:?}");
    }

    #[test]
    fn a_new_endpoint_is_tried_before_measured_ones() {
        let t0 = Instant::now();
        let mut b = Balancer::new(BalanceConfig::default(), 3);
        serve(&mut b, 0, t0, ms(1), Outcome::Success);
        serve(&mut b, 1, t0, ms(1), Outcome::Success);
        let mut random = sequence();
        let picks: Vec<usize> = (0..20)
            .filter_map(|_| b.pick(t0, &[], &mut random))
            .collect();
        assert!(picks.contains(&2), "{picks:?}");
    }

    #[test]
    fn pending_requests_count_against_an_endpoint() {
        let t0 = Instant::now();
        let mut b = Balancer::new(BalanceConfig::default(), 2);
        serve(&mut b, 0, t0, ms(10), Outcome::Success);
        serve(&mut b, 1, t0, ms(10), Outcome::Success);
        for _ in 0..3 {
            b.start(0);
        }
        assert!(b.cost(0, t0) > b.cost(1, t0));
        assert_eq!(b.pick(t0, &[], sequence()), Some(1));
    }

    #[test]
    fn a_latency_spike_is_taken_at_once_and_fades() {
        let t0 = Instant::now();
        let mut b = Balancer::new(BalanceConfig::default(), 1);
        serve(&mut b, 0, t0, ms(10), Outcome::Success);
        serve(&mut b, 0, t0 + ms(1), ms(500), Outcome::Success);
        assert!(b.cost(0, t0 + ms(1)) >= 499e6);
        serve(&mut b, 0, t0 + ms(2), ms(10), Outcome::Success);
        assert!(b.cost(0, t0 + ms(2)) > 400e6, "a peak fades slowly");
        assert!(b.cost(0, t0 + Duration::from_secs(30)) < 30e6);
    }

    #[test]
    fn consecutive_failures_eject_and_the_endpoint_returns_after_backoff() {
        let t0 = Instant::now();
        let config = BalanceConfig::default();
        let mut b = Balancer::new(config.clone(), 2);
        for k in 0..config.eject_after {
            assert!(!b.is_ejected(0, t0), "ejected after {k} failures");
            serve(&mut b, 0, t0, ms(1), Outcome::Failure);
        }
        assert!(b.is_ejected(0, t0));
        let mut random = sequence();
        for _ in 0..50 {
            assert_eq!(b.pick(t0 + ms(10), &[], &mut random), Some(1));
        }
        // Back after the first ejection period.
        let back = t0 + config.base_ejection;
        assert!(!b.is_ejected(0, back));
        // Failing again at once ejects it for twice as long.
        serve(&mut b, 0, back, ms(1), Outcome::Failure);
        assert!(b.is_ejected(0, back + config.base_ejection));
        assert!(!b.is_ejected(0, back + 2 * config.base_ejection));
        // A success after return resets the backoff.
        let later = back + 2 * config.base_ejection;
        serve(&mut b, 0, later, ms(1), Outcome::Success);
        for _ in 0..config.eject_after {
            serve(&mut b, 0, later, ms(1), Outcome::Failure);
        }
        assert!(b.is_ejected(0, later));
        assert!(!b.is_ejected(0, later + config.base_ejection));
    }

    #[test]
    fn with_every_endpoint_ejected_requests_still_go_somewhere() {
        let t0 = Instant::now();
        let config = BalanceConfig::default();
        let mut b = Balancer::new(config.clone(), 2);
        for i in 0..2 {
            for _ in 0..config.eject_after {
                serve(&mut b, i, t0, ms(1), Outcome::Failure);
            }
        }
        assert!(b.pick(t0, &[], sequence()).is_some());
        assert_eq!(Balancer::new(config, 0).pick(t0, &[], sequence()), None);
    }

    #[test]
    fn a_retry_avoids_the_endpoints_already_tried() {
        let t0 = Instant::now();
        let b = Balancer::new(BalanceConfig::default(), 3);
        let mut random = sequence();
        for _ in 0..50 {
            let i = b.pick(t0, &[0, 2], &mut random).unwrap();
            assert_eq!(i, 1);
        }
        // With all tried, one of them is used again rather than failing.
        assert!(b.pick(t0, &[0, 1, 2], &mut random).is_some());
    }

    #[test]
    fn an_abandoned_request_ends_its_pending_count_and_only_raises_the_estimate() {
        let t0 = Instant::now();
        let config = BalanceConfig::default();
        let mut b = Balancer::new(config.clone(), 1);
        serve(&mut b, 0, t0, ms(10), Outcome::Success);
        let measured = b.cost(0, t0);
        // Given up after 1 ms: the answer might have come at 10 ms.
        serve(&mut b, 0, t0, ms(1), Outcome::Abandoned);
        assert_eq!(b.cost(0, t0), measured, "pending back to 0, estimate kept");
        // Given up after 100 ms: it takes at least that long.
        serve(&mut b, 0, t0, ms(100), Outcome::Abandoned);
        assert!(b.cost(0, t0) >= ms(100).as_nanos() as f64);
        // Neither a failure nor a success: no ejection however many.
        for _ in 0..config.eject_after * 3 {
            serve(&mut b, 0, t0, ms(1), Outcome::Abandoned);
        }
        assert!(!b.is_ejected(0, t0));
    }
}
