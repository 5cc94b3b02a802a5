//! A source fed in process: a [`Store`] that the caller changes with the same events the
//! API source's watches deliver (benchmarks of the agent at cluster scale).

use super::store::Store;
use super::{Change, Source};
use crate::cluster::manifests::Manifests;
use std::ops::Deref;

/// A store the caller feeds.
#[derive(Debug, Default)]
pub struct MemorySource {
    /// The objects; change them through [`Store::apply`], [`Store::delete`] and
    /// [`Store::relist`].
    pub store: Store,
}

impl Source for MemorySource {
    fn changed(&mut self) -> Option<Change> {
        self.store.take_changes()
    }

    fn state(&self) -> Box<dyn Deref<Target = Manifests> + '_> {
        Box::new(self.store.state())
    }

    fn describe(&self) -> String {
        "objects fed in process".into()
    }
}
