//! Entries a worker really holds (fetched and not yet settled). Only these are renewed: an
//! entry assigned by an `XREADGROUP` whose reply was lost (Redis died mid-reply) is in this
//! consumer's pending list but not here, so it goes idle and is recovered as an orphan instead
//! of being kept alive for ever.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug, Clone, Default)]
pub(crate) struct InFlight(Arc<Mutex<HashSet<String>>>);

impl InFlight {
    pub(crate) fn add<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        set.extend(ids.into_iter().map(str::to_owned));
    }

    pub(crate) fn remove<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            set.remove(id);
        }
    }

    /// The entries held now.
    pub(crate) fn held(&self) -> HashSet<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn snapshot(&self) -> Vec<String> {
        let set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        set.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn add_remove_snapshot() {
        let inflight = super::InFlight::default();
        inflight.add(["1-0", "2-0"]);
        inflight.remove(["1-0"]);
        assert_eq!(inflight.snapshot(), vec!["2-0".to_owned()]);
        assert_eq!(inflight.held(), HashSet::from(["2-0".to_owned()]));
    }
}
