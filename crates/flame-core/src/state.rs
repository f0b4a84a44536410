//! App state in remote code: the resources an app builds once in `main`
//! (a database pool, an HTTP client, its config) and hands to flame, which
//! passes them to remote functions as [`State`] parameters, as axum does
//! for handlers.
//!
//! Parent and runner run the same `main`, so each builds its own copy; state
//! never travels over the network.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// A parameter a remote function takes from the app's state instead of
/// from its caller: `State(db): State<Db>`. `T` is cloned out of the state
/// for each call (wrap it in an `Arc`, or use a handle type such as a
/// connection pool, when cloning it would be costly).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State<T>(pub T);

/// The state an app gave flame, one value per type.
#[derive(Clone, Default)]
pub struct States {
    by_type: HashMap<TypeId, Entry>,
}

#[derive(Clone)]
struct Entry {
    name: &'static str,
    value: Arc<dyn Any + Send + Sync>,
}

impl States {
    /// No state.
    pub fn new() -> States {
        States::default()
    }

    /// Adds `value`, replacing any value of the same type.
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        self.by_type.insert(
            TypeId::of::<T>(),
            Entry {
                name: std::any::type_name::<T>(),
                value: Arc::new(value),
            },
        );
    }

    /// A clone of the value of type `T`, if there is one.
    pub fn get<T: Clone + 'static>(&self) -> Option<T> {
        self.by_type
            .get(&TypeId::of::<T>())
            .and_then(|e| e.value.downcast_ref::<T>())
            .cloned()
    }

    /// True when there is a value of this type.
    pub fn contains(&self, key: &StateKey) -> bool {
        self.by_type.contains_key(&key.id)
    }
}

impl fmt::Debug for States {
    /// Lists the types only: state may hold secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.by_type.values().map(|e| e.name).collect();
        names.sort_unstable();
        f.debug_struct("States").field("types", &names).finish()
    }
}

/// A type of state a remote function needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateKey {
    id: TypeId,
    name: &'static str,
}

impl StateKey {
    /// The key of `T`.
    pub fn of<T: 'static>() -> StateKey {
        StateKey {
            id: TypeId::of::<T>(),
            name: std::any::type_name::<T>(),
        }
    }

    /// The type's name, for messages.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Db(String);

    #[test]
    fn values_are_found_by_type_and_debug_shows_only_types() {
        let mut states = States::new();
        assert!(states.get::<Db>().is_none());
        states.insert(Db("secret-dsn".into()));
        states.insert(7u32);
        assert_eq!(states.get::<Db>(), Some(Db("secret-dsn".into())));
        assert_eq!(states.get::<u32>(), Some(7));
        assert!(states.contains(&StateKey::of::<Db>()));
        assert!(!states.contains(&StateKey::of::<u64>()));
        let shown = format!("{states:?}");
        assert!(
            shown.contains("Db") && !shown.contains("secret-dsn"),
            "{shown}"
        );
    }
}
