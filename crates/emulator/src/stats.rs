//! Counts of completed instructions, for the monitor's `status` report.

use std::collections::BTreeMap;

/// Per-vCPU counters; the monitor keeps one per vCPU and [`Stats::merge`]s them for reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    per_mnemonic: BTreeMap<&'static str, u64>,
    exceptions: u64,
    failures: u64,
}

impl Stats {
    /// Counts one decoded instruction that the completer handled (done or exception).
    pub(crate) fn record(&mut self, mnemonic: &'static str) {
        let c = self.per_mnemonic.entry(mnemonic).or_insert(0);
        *c = c.saturating_add(1);
    }

    pub(crate) fn record_exception(&mut self) {
        self.exceptions = self.exceptions.saturating_add(1);
    }

    pub(crate) fn record_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    /// Instructions handled (completed or turned into an exception), all mnemonics.
    pub fn total(&self) -> u64 {
        self.per_mnemonic
            .values()
            .fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// Instructions handled with this lower-case mnemonic (e.g. `"int3"`, `"cmpxchg16b"`).
    pub fn count(&self, mnemonic: &str) -> u64 {
        self.per_mnemonic.get(mnemonic).copied().unwrap_or(0)
    }

    /// `(mnemonic, count)` pairs in mnemonic order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.per_mnemonic.iter().map(|(k, v)| (*k, *v))
    }

    /// Completions that ended in an exception for the guest (including fetch faults that
    /// happened before an instruction could be decoded).
    pub fn exceptions(&self) -> u64 {
        self.exceptions
    }

    /// Completions that failed with an [`crate::EmulationError`].
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Adds `other`'s counts into `self` (to sum the vCPUs of a VM).
    pub fn merge(&mut self, other: &Stats) {
        for (k, v) in other.iter() {
            let c = self.per_mnemonic.entry(k).or_insert(0);
            *c = c.saturating_add(v);
        }
        self.exceptions = self.exceptions.saturating_add(other.exceptions);
        self.failures = self.failures.saturating_add(other.failures);
    }
}

#[cfg(test)]
mod tests {
    use super::Stats;

    #[test]
    fn counts_and_merges() {
        let mut a = Stats::default();
        a.record("int3");
        a.record("int3");
        a.record("mfence");
        a.record_exception();
        let mut b = Stats::default();
        b.record("int3");
        b.record_failure();
        a.merge(&b);
        assert_eq!(a.count("int3"), 3);
        assert_eq!(a.count("mfence"), 1);
        assert_eq!(a.count("popcnt"), 0);
        assert_eq!(a.total(), 4);
        assert_eq!(a.exceptions(), 1);
        assert_eq!(a.failures(), 1);
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            vec![("int3", 3), ("mfence", 1)]
        );
    }
}
