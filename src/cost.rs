//! What jobs cost before they are paid for: the prices behind `validate`'s and
//! `run --dry-run`'s credit preview and behind `run --max-credits`.
//!
//! Where a price comes from, in order:
//! 1. the user's `cost_per_job` for the provider (they know their contract);
//! 2. the provider's own estimate, where its API gives one (Topaz `/estimate`,
//!    `/estimate-gen`). One request per *distinct parameter set* — same operation,
//!    same parameters, same input size — not per job: a million photos from one
//!    camera with one set of parameters cost one request, not a million, and the
//!    rate limit stays free for the work. At most [`MAX_ESTIMATES`] sets are asked
//!    about; the rest are priced at the highest estimate seen (an upper bound), and
//!    the preview says so. Jobs with a URL input are grouped by parameters alone
//!    (fetching every URL to learn its size would cost more than it tells) and
//!    priced by the first such job's input;
//! 3. the most the provider's document allows (AIThriving: 2 credits per result);
//! 4. otherwise the cost is unknown, and the preview says what to configure.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::api::{Api, ProviderError};
use crate::config::Config;
use crate::model::{JobSpec, ProviderKind};
use crate::providers::{self, Provider};

/// Distinct parameter sets asked about per provider, at most.
pub const MAX_ESTIMATES: usize = 100;

/// How many distinct parameter sets a preview keeps per provider before it stops
/// telling them apart (memory stays bounded on a million varied rows).
const MAX_GROUPS: usize = 10_000;

/// Jobs that cost the same: same provider, operation, parameters and input sizes.
pub type GroupKey = [u8; 32];

/// The group a job's price is shared with. Reads the header of each local input
/// (its size decides the output size, and so the price).
pub fn group_key(spec: &JobSpec) -> GroupKey {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    field(spec.provider.name().as_bytes());
    field(spec.operation.as_bytes());
    field(crate::model::canonical_json(&spec.params_json).as_bytes());
    for input in &spec.inputs {
        if providers::util::is_url(input) {
            field(b"<url>");
        } else {
            match providers::util::dimensions_of_file(Path::new(input)) {
                Some((w, h)) => field(format!("{w}x{h}").as_bytes()),
                // Unreadable: its own group (its estimate will say what is wrong).
                None => field(input.as_bytes()),
            }
        }
    }
    h.finalize().into()
}

/// A provider's estimates, asked once per parameter set and remembered.
pub struct Estimator {
    adapter: Arc<dyn Provider>,
    api: Api,
    cache: HashMap<GroupKey, f64>,
    /// Requests made (successful or not).
    pub calls: usize,
    /// Jobs priced at the highest estimate because [`MAX_ESTIMATES`] was reached.
    pub beyond_limit: u64,
    highest: Option<f64>,
}

impl Estimator {
    pub fn new(adapter: Arc<dyn Provider>, api: Api) -> Estimator {
        Estimator {
            adapter,
            api,
            cache: HashMap::new(),
            calls: 0,
            beyond_limit: 0,
            highest: None,
        }
    }

    /// The price already learned for group `key`, without asking.
    pub fn cached(&self, key: &GroupKey) -> Option<f64> {
        self.cache.get(key).copied()
    }

    /// The distinct parameter sets priced so far.
    pub fn sets(&self) -> usize {
        self.cache.len()
    }

    /// The price of one job of group `key` (`spec` is any job of it). A 429 or a
    /// transient failure is tried again a few times, with backoff.
    pub async fn price(&mut self, key: GroupKey, spec: &JobSpec) -> Result<f64, String> {
        if let Some(&c) = self.cache.get(&key) {
            return Ok(c);
        }
        // A published price table settles it: no request.
        if let Some(c) = providers::table_cost(spec) {
            self.cache.insert(key, c);
            self.highest = Some(self.highest.map_or(c, |h| h.max(c)));
            return Ok(c);
        }
        if self.calls >= MAX_ESTIMATES {
            if let Some(h) = self.highest {
                self.beyond_limit += 1;
                return Ok(h);
            }
        }
        const TRIES: u32 = 4;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.calls += 1;
            match self.adapter.estimate_cost(&self.api, spec).await {
                Ok(Some(c)) => {
                    self.cache.insert(key, c);
                    self.highest = Some(self.highest.map_or(c, |h| h.max(c)));
                    return Ok(c);
                }
                Ok(None) => {
                    return Err(format!(
                        "{}'s estimate did not say what job {} costs",
                        spec.provider, spec.id
                    ))
                }
                Err(ProviderError::Transient {
                    reason,
                    retry_after,
                    ..
                }) if attempt < TRIES => {
                    let wait = crate::engine::retry::backoff_delay(attempt, retry_after);
                    tracing::debug!(job = %spec.id, "estimate failed ({reason}); again in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    return Err(format!(
                        "could not estimate what job {} costs: {e}",
                        spec.id
                    ))
                }
            }
        }
    }
}

/// One provider's jobs as the preview sees them.
#[derive(Default)]
struct Bucket {
    jobs: u64,
    groups: HashMap<GroupKey, (u64, JobSpec)>,
    /// Jobs past [`MAX_GROUPS`], priced at the highest estimate.
    ungrouped: u64,
}

/// Collects the jobs to price (those not yet submitted), grouping them only for
/// providers whose price is estimated per group.
#[derive(Default)]
pub struct Collector {
    grouped: Vec<ProviderKind>,
    buckets: BTreeMap<ProviderKind, Bucket>,
}

impl Collector {
    /// `grouped`: the providers whose jobs are priced by an estimate per group.
    pub fn new(grouped: Vec<ProviderKind>) -> Collector {
        Collector {
            grouped,
            buckets: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, spec: &JobSpec) {
        let bucket = self.buckets.entry(spec.provider).or_default();
        bucket.jobs += 1;
        if !self.grouped.contains(&spec.provider) {
            return;
        }
        let key = group_key(spec);
        if let Some(g) = bucket.groups.get_mut(&key) {
            g.0 += 1;
        } else if bucket.groups.len() < MAX_GROUPS {
            bucket.groups.insert(key, (1, spec.clone()));
        } else {
            bucket.ungrouped += 1;
        }
    }

    /// Counts `n` jobs of `kind` without looking at them (a provider priced per job).
    pub fn add_count(&mut self, kind: ProviderKind, n: u64) {
        if n > 0 {
            self.buckets.entry(kind).or_default().jobs += n;
        }
    }

    /// Whether jobs of `kind` must be seen one by one (priced per group).
    pub fn groups(&self, kind: ProviderKind) -> bool {
        self.grouped.contains(&kind)
    }

    pub fn jobs(&self, kind: ProviderKind) -> u64 {
        self.buckets.get(&kind).map_or(0, |b| b.jobs)
    }
}

/// What the preview says about one provider's money.
#[derive(Debug, Clone, PartialEq)]
pub struct CostLine {
    /// Jobs still to pay for.
    pub jobs: u64,
    /// Their estimated total, when known.
    pub credits: Option<f64>,
    pub unit: &'static str,
    /// Where the figure comes from, or why there is none.
    pub how: String,
    /// The account's balance, where the provider tells it.
    pub balance: Option<f64>,
}

/// The providers a preview should estimate per group: no configured price, a key,
/// and an API that estimates. Returns their estimators.
pub async fn estimators(
    config: &Config,
    kinds: &[ProviderKind],
) -> BTreeMap<ProviderKind, Result<Estimator, String>> {
    let mut out = BTreeMap::new();
    for &kind in kinds {
        let pc = config.provider(kind);
        if pc.cost_per_job.is_some() || !has_credentials(&pc.credentials) {
            continue;
        }
        let Ok(adapter) = providers::build(&pc) else {
            continue;
        };
        if !adapter.can_estimate() {
            continue;
        }
        let made = crate::engine::standalone(config, kind)
            .await
            .map(|(adapter, api)| Estimator::new(adapter, api));
        out.insert(kind, made);
    }
    out
}

pub fn has_credentials(c: &providers::Credentials) -> bool {
    c.api_key.as_deref().is_some_and(|k| !k.trim().is_empty())
        || (c.client_id.is_some() && c.client_secret.is_some())
}

/// Prices what `collector` holds. `estimators` come from [`estimators`];
/// `online` allows balance requests.
pub async fn price(
    config: &Config,
    collector: &Collector,
    estimators: &mut BTreeMap<ProviderKind, Result<Estimator, String>>,
    online: bool,
) -> BTreeMap<ProviderKind, CostLine> {
    let mut out = BTreeMap::new();
    for (&kind, bucket) in &collector.buckets {
        let pc = config.provider(kind);
        let unit = providers::cost_unit(kind);
        let jobs = bucket.jobs;
        let (credits, how) = if let Some(c) = pc.cost_per_job {
            (
                Some(c * jobs as f64),
                format!("{jobs} × cost_per_job {c} (configured)"),
            )
        } else if let Some(total) = table_total(bucket) {
            (
                Some(total),
                format!("{kind}'s published credit tables (per output megapixel), no request"),
            )
        } else if let Some(est) = estimators.get_mut(&kind) {
            match est {
                // The line already says "unknown": the reason alone.
                Err(e) => (None, e.clone()),
                Ok(est) => estimate_bucket(kind, bucket, est).await,
            }
        } else if let Some(max) = documented_max_of(kind) {
            (
                Some(max * jobs as f64),
                format!(
                    "at most {max} per job by {kind}'s document; set cost_per_job for your price"
                ),
            )
        } else if !online && can_estimate_without_key(kind) {
            (
                None,
                "its estimate is a request, not made with --offline".to_string(),
            )
        } else if !has_credentials(&pc.credentials) && can_estimate_without_key(kind) {
            (
                None,
                format!(
                    "its estimate needs a key ({}), or set cost_per_job",
                    crate::config::env_names(kind).1
                ),
            )
        } else {
            (
                None,
                format!("{kind}'s API does not tell; set [providers.{kind}] cost_per_job"),
            )
        };
        let balance = if online && has_credentials(&pc.credentials) {
            balance_of(config, kind).await
        } else {
            None
        };
        out.insert(
            kind,
            CostLine {
                jobs,
                credits,
                unit,
                how,
                balance,
            },
        );
    }
    out
}

/// A bucket priced entirely by published tables ([`providers::table_cost`]), when
/// every one of its groups is (and none was left ungrouped).
fn table_total(bucket: &Bucket) -> Option<f64> {
    if bucket.groups.is_empty() || bucket.ungrouped > 0 {
        return None;
    }
    let mut total = 0.0;
    for (count, spec) in bucket.groups.values() {
        total += providers::table_cost(spec)? * *count as f64;
    }
    Some(total)
}

/// The most one job of `kind` can cost by its document.
pub fn documented_max_of(kind: ProviderKind) -> Option<f64> {
    let probe = JobSpec {
        id: "probe".into(),
        provider: kind,
        operation: String::new(),
        inputs: Vec::new(),
        prompt: None,
        params_json: "{}".into(),
        output: None,
        metadata: Vec::new(),
    };
    providers::documented_max_cost(&probe)
}

/// Providers whose API estimates once it has a key (the preview says so offline).
fn can_estimate_without_key(kind: ProviderKind) -> bool {
    kind == ProviderKind::Topaz
}

async fn estimate_bucket(
    kind: ProviderKind,
    bucket: &Bucket,
    est: &mut Estimator,
) -> (Option<f64>, String) {
    let mut total = 0.0;
    let mut highest: Option<f64> = None;
    for (key, (count, spec)) in &bucket.groups {
        match est.price(*key, spec).await {
            Ok(c) => {
                total += c * *count as f64;
                highest = Some(highest.map_or(c, |h| h.max(c)));
            }
            Err(e) => return (None, e),
        }
    }
    if bucket.ungrouped > 0 {
        total += highest.unwrap_or(0.0) * bucket.ungrouped as f64;
    }
    let mut how = format!(
        "{kind} estimate: {} request(s) for {} distinct parameter set(s)",
        est.calls,
        bucket.groups.len()
    );
    let guessed = est.beyond_limit + bucket.ungrouped;
    if guessed > 0 {
        how.push_str(&format!(
            "; {guessed} job(s) beyond {MAX_ESTIMATES} sets priced at the highest estimate"
        ));
    }
    (Some(total), how)
}

async fn balance_of(config: &Config, kind: ProviderKind) -> Option<f64> {
    let (adapter, api) = crate::engine::standalone(config, kind).await.ok()?;
    match adapter.balance(&api).await {
        Ok(Some(b)) => Some(b.amount),
        _ => None,
    }
}

/// `1234.5` → "1234.5", `12.0` → "12".
pub fn amount(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, input: &str, params: &str) -> JobSpec {
        JobSpec {
            id: id.into(),
            provider: ProviderKind::Topaz,
            operation: "enhance".into(),
            inputs: vec![input.into()],
            prompt: None,
            params_json: params.into(),
            output: None,
            metadata: Vec::new(),
        }
    }

    fn png(path: &Path, w: u32, h: u32) {
        image::RgbImage::new(w, h).save(path).unwrap();
    }

    #[test]
    fn jobs_share_a_group_by_parameters_and_input_size_not_by_id_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a.png"),
            dir.path().join("b.png"),
            dir.path().join("c.png"),
        );
        png(&a, 20, 10);
        png(&b, 20, 10);
        png(&c, 30, 10);
        let s = |id: &str, p: &Path, params: &str| spec(id, p.to_str().unwrap(), params);
        let k = group_key(&s("1", &a, r#"{"x":1,"y":2}"#));
        assert_eq!(k, group_key(&s("2", &b, r#"{"y":2, "x":1}"#)));
        assert_ne!(k, group_key(&s("3", &c, r#"{"x":1,"y":2}"#)));
        assert_ne!(k, group_key(&s("4", &a, r#"{"x":1}"#)));
        // URL inputs group by parameters alone.
        assert_eq!(
            group_key(&spec("5", "https://e.com/1.png", "{}")),
            group_key(&spec("6", "https://e.com/2.png", "{}"))
        );
    }

    #[test]
    fn the_collector_counts_every_job_but_groups_only_estimated_providers() {
        let mut c = Collector::new(vec![ProviderKind::Topaz]);
        c.add(&spec("1", "https://e.com/1.png", "{}"));
        c.add(&spec("2", "https://e.com/2.png", "{}"));
        let mut p = spec("3", "https://e.com/3.png", "{}");
        p.provider = ProviderKind::Photio;
        c.add(&p);
        assert_eq!(c.jobs(ProviderKind::Topaz), 2);
        assert_eq!(c.jobs(ProviderKind::Photio), 1);
        assert_eq!(c.buckets[&ProviderKind::Topaz].groups.len(), 1);
        assert!(c.buckets[&ProviderKind::Photio].groups.is_empty());
    }

    #[test]
    fn amounts_print_without_noise() {
        assert_eq!(amount(12.0), "12");
        assert_eq!(amount(0.4 * 3.0), "1.20");
    }
}
