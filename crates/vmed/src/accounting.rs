//! The daemon's side of accounting ([`crate::usage`]): a sampler thread that records every
//! live monitor's usage each `sample_interval` and prunes samples past `usage_retention`; a
//! last sample when a monitor exits (so a short run is counted), after which its cgroup is
//! removed; and the `usage` query behind `GET /1.0/vms/{name}/usage`.

use crate::cgroup;
use crate::daemon::{Daemon, OpError};
use crate::usage::{self, Sample};
use serde_json::{Value, json};
use std::sync::{Arc, Weak};

/// Most samples one usage reply lists (the newest); its totals cover the whole window.
const MAX_LISTED: usize = 10_000;

pub fn spawn_sampler(d: &Arc<Daemon>) {
    let weak: Weak<Daemon> = Arc::downgrade(d);
    let every = d.config().sample_interval;
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(every);
            // The daemon is gone (a test's, or one being replaced): so is the sampler.
            let Some(d) = weak.upgrade() else { return };
            d.sample_all();
        }
    });
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// One tick: samples every live monitor, stores the samples, prunes old ones.
    pub(crate) fn sample_all(&self) {
        let live: Vec<_> = lock(&self.monitors)
            .iter()
            .map(|(n, m)| (n.clone(), m.pid, m.cgroup.clone(), m.taps.clone()))
            .collect();
        let mut samples = Vec::new();
        {
            let mut last = lock(&self.last_samples);
            last.retain(|n, _| live.iter().any(|(l, ..)| l == n));
            for (name, pid, group, taps) in &live {
                if let Some(s) = usage::collect(name, *pid, group.as_deref(), taps, last.get(name))
                {
                    last.insert(name.clone(), s.clone());
                    samples.push(s);
                }
            }
        }
        let cutoff = usage::now_ms() - self.config().usage_retention.as_millis() as i64;
        let mut store = self.store();
        if let Err(e) = store.add_samples(&samples) {
            eprintln!("vmed: cannot store usage samples: {e}");
        }
        if let Err(e) = store.prune_samples(cutoff) {
            eprintln!("vmed: cannot prune usage samples: {e}");
        }
    }

    /// A monitor has exited: records its last usage (its cgroup still holds the CPU time),
    /// then removes its cgroup. Returns why the kernel killed it, if its OOM killer did
    /// (the cgroup's count says so only while the cgroup exists).
    pub(crate) fn account_exit(&self, name: &str) -> Option<String> {
        let (pid, group, taps) = lock(&self.monitors)
            .get(name)
            .map(|m| (m.pid, m.cgroup.clone(), m.taps.clone()))?;
        let mut oom = None;
        let prev = lock(&self.last_samples).remove(name);
        if let Some(dir) = &group {
            // Without cgroups the process is gone and nothing new can be read.
            if let Some(s) = usage::collect(name, pid, Some(dir), &taps, prev.as_ref()) {
                if let Err(e) = self.store().add_samples(&[s]) {
                    eprintln!("vmed: cannot store VM {name:?}'s last usage sample: {e}");
                }
            }
            oom = cgroup::oom_killed(dir);
            if let Err(e) = cgroup::remove(dir) {
                eprintln!("vmed: VM {name:?}: {e}");
            }
        }
        oom
    }

    /// `GET /1.0/vms/{name}/usage?since=`: the samples since then, their totals, the newest
    /// sample and the rates between the last two.
    pub fn usage(&self, name: &str, since: Option<&str>) -> Result<Value, OpError> {
        let vm = self.get(name)?;
        let since_ms = match since {
            None => 0,
            Some(s) => usage::parse_since(s).map_err(OpError::BadRequest)?,
        };
        let samples: Vec<Sample> = self.store().samples(name, since_ms)?;
        let totals = usage::totals(&samples);
        let rates = usage::rates(&samples);
        let latest = samples.last().cloned();
        let listed = &samples[samples.len().saturating_sub(MAX_LISTED)..];
        Ok(json!({
            "name": vm.name,
            "state": vm.state,
            "since_ms": since_ms,
            "sample_interval_seconds": self.config().sample_interval.as_secs(),
            "totals": totals,
            "latest": latest,
            "rates": rates,
            "samples": listed,
        }))
    }
}
