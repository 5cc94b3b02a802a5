//! A list of cluster objects kept in place by their key (namespace, name): read as a
//! slice, and changed one object at a time without rebuilding the list, as watch events
//! arrive.

use indexmap::IndexSet;
use std::ops::Deref;

/// An object's key: its namespace (empty for cluster-scoped kinds) and name.
pub type ObjectKey = (String, String);

/// Objects by key, in a dense list (order: insertion, with removals filled from the end).
/// Each key is stored once: the set's position of a key is its object's position.
#[derive(Debug, Clone)]
pub struct Keyed<T> {
    items: Vec<T>,
    keys: IndexSet<ObjectKey>,
}

impl<T> Default for Keyed<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            keys: IndexSet::new(),
        }
    }
}

/// Where an object went, so that an index over positions can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// Nothing else moved.
    Nothing,
    /// The object that was at `from` is now at `to`.
    Object {
        /// Its old position.
        from: usize,
        /// Its new position.
        to: usize,
    },
}

impl<T> Keyed<T> {
    /// Puts `value` under `key`; returns its position and the value it replaced.
    pub fn insert(&mut self, key: ObjectKey, value: T) -> (usize, Option<T>) {
        match self.keys.get_index_of(&key) {
            Some(at) => (at, Some(std::mem::replace(&mut self.items[at], value))),
            None => {
                let at = self.items.len();
                self.keys.insert(key);
                self.items.push(value);
                (at, None)
            }
        }
    }

    /// Takes the object under `key` out: its old position, the value, and the object moved
    /// into that position to keep the list dense.
    pub fn remove(&mut self, key: &ObjectKey) -> Option<(usize, T, Moved)> {
        let (at, _) = self.keys.swap_remove_full(key)?;
        let last = self.items.len() - 1;
        let value = self.items.swap_remove(at);
        let moved = if at == last {
            Moved::Nothing
        } else {
            Moved::Object { from: last, to: at }
        };
        Some((at, value, moved))
    }

    /// The object under `key`.
    pub fn get(&self, key: &ObjectKey) -> Option<&T> {
        self.position(key).map(|at| &self.items[at])
    }

    /// The position of the object under `key`.
    pub fn position(&self, key: &ObjectKey) -> Option<usize> {
        self.keys.get_index_of(key)
    }

    /// The key of the object at `at`.
    pub fn key_at(&self, at: usize) -> &ObjectKey {
        &self.keys[at]
    }

    /// Every key, in the list's order.
    pub fn keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.keys.iter()
    }

    /// The objects, to change in place (never in what their key is made of).
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, T> {
        self.items.iter_mut()
    }

    /// Orders the list by `compare` (for a stable reading order).
    pub fn sort_by(&mut self, mut compare: impl FnMut(&T, &T) -> std::cmp::Ordering) {
        let mut pairs: Vec<(T, ObjectKey)> = std::mem::take(&mut self.items)
            .into_iter()
            .zip(std::mem::take(&mut self.keys))
            .collect();
        pairs.sort_by(|(a, _), (b, _)| compare(a, b));
        (self.items, self.keys) = pairs.into_iter().unzip();
    }
}

impl<T> Deref for Keyed<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.items
    }
}

impl<'a, T> IntoIterator for &'a Keyed<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ("ns".into(), name.into())
    }

    #[test]
    fn an_insert_under_a_known_key_replaces_in_place() {
        let mut k = Keyed::default();
        assert_eq!(k.insert(key("a"), 1), (0, None));
        assert_eq!(k.insert(key("b"), 2), (1, None));
        assert_eq!(k.insert(key("a"), 3), (0, Some(1)));
        assert_eq!(&k[..], &[3, 2]);
        assert_eq!(k.get(&key("a")), Some(&3));
    }

    #[test]
    fn a_removal_fills_the_hole_from_the_end_and_says_so() {
        let mut k = Keyed::default();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            k.insert(key(name), i);
        }
        assert_eq!(
            k.remove(&key("a")),
            Some((0, 0, Moved::Object { from: 2, to: 0 }))
        );
        assert_eq!(&k[..], &[2, 1]);
        assert_eq!(k.position(&key("c")), Some(0));
        assert_eq!(k.key_at(0), &key("c"));
        assert_eq!(k.remove(&key("b")), Some((1, 1, Moved::Nothing)));
        assert_eq!(k.remove(&key("b")), None);
        assert_eq!(&k[..], &[2]);
    }

    #[test]
    fn sorting_keeps_every_key_on_its_object() {
        let mut k = Keyed::default();
        for (name, v) in [("x", 3), ("y", 1), ("z", 2)] {
            k.insert(key(name), v);
        }
        k.sort_by(|a, b| a.cmp(b));
        assert_eq!(&k[..], &[1, 2, 3]);
        assert_eq!(k.get(&key("x")), Some(&3));
        assert_eq!(k.position(&key("y")), Some(0));
        assert_eq!(k.key_at(2), &key("x"));
    }
}
