//! Remote functions, found by stable names.
//!
//! `#[flame::remote]` and the inline `flame::call!` form each register a
//! [`Registration`] at link time (through the `inventory` crate). Parent and
//! runner are the same build, so a name means the same code on both sides; no
//! machine code is ever shipped.

use std::collections::HashMap;
use std::future::Future;
use std::sync::OnceLock;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{de::DeserializeOwned, Serialize};

use crate::state::{StateKey, States};
use crate::{codec, Error};

/// A function that can be called on a pool by its registered name.
///
/// Implemented by the items `#[flame::remote]` and `flame::call!` generate;
/// there is rarely a reason to implement it by hand.
pub trait RemoteFn {
    /// Stable name, unique in the build: module path plus function name, or
    /// plus `line:column` for inline blocks.
    const NAME: &'static str;
    /// The arguments, as a tuple.
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// The return value (often a `Result<T, E>` of the function's own).
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Decodes the return value the runner sent. `#[flame::remote]`
    /// overrides it for a `Vec<u8>` (or `Result<Vec<u8>, E>`) result, which
    /// then decodes as one block of bytes rather than byte by byte.
    fn decode_output(bytes: &[u8]) -> Result<Self::Output, codec::DecodeError> {
        codec::decode(bytes)
    }

    /// Encodes the arguments for the runner, appending to `out`.
    /// `#[flame::remote]` overrides it when a parameter is a `Vec<u8>`,
    /// which then encodes as one block of bytes rather than byte by byte.
    fn encode_args(args: &Self::Args, out: &mut Vec<u8>) -> Result<(), codec::EncodeError> {
        codec::encode_into(args, out)
    }
}

/// Why a registered function could not run or answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvokeError {
    /// The arguments did not decode into the parameter types.
    DecodeArgs(String),
    /// The return value did not encode.
    EncodeResult(String),
    /// The app gave flame no state of this type (checked at start-up, so
    /// seen only when parent and runner set up different state).
    MissingState(&'static str),
}

/// What a handler hands the runner to execute.
pub enum Invocation {
    /// An `async fn` (or `async` inline block): polled on the runner's
    /// runtime and dropped at its next await point if the deadline passes.
    Async(BoxFuture<'static, Result<Vec<u8>, InvokeError>>),
    /// A plain `fn` (or plain inline block): run on the blocking thread pool,
    /// so CPU-heavy or blocking code cannot stall the runner. Code that does
    /// not await cannot be interrupted; the caller still gets its timeout at
    /// the deadline.
    Blocking(Box<dyn FnOnce() -> Result<Vec<u8>, InvokeError> + Send>),
    /// The arguments did not decode; nothing runs.
    Refused(InvokeError),
}

impl std::fmt::Debug for Invocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Invocation::Async(_) => "Invocation::Async",
            Invocation::Blocking(_) => "Invocation::Blocking",
            Invocation::Refused(_) => "Invocation::Refused",
        })
    }
}

/// Type-erased entry point: takes the function's state, decodes the
/// arguments and prepares the call.
pub type Handler = fn(Bytes, &States) -> Invocation;

/// The state types a function needs.
pub type NeededStates = fn() -> Vec<StateKey>;

fn no_states() -> Vec<StateKey> {
    Vec::new()
}

/// One registered function.
#[derive(Debug)]
pub struct Registration {
    name: &'static str,
    handler: Handler,
    states: NeededStates,
    file: &'static str,
    line: u32,
}

impl Registration {
    /// Describes a function. Used by the macros.
    pub const fn new(name: &'static str, handler: Handler, file: &'static str, line: u32) -> Self {
        Registration {
            name,
            handler,
            states: no_states,
            file,
            line,
        }
    }

    /// The function takes these types of state. Used by the macros.
    pub const fn needs(mut self, states: NeededStates) -> Self {
        self.states = states;
        self
    }

    /// The registered name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Source location, for messages.
    pub fn location(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

inventory::collect!(Registration);

fn encode_result<R: Serialize>(out: &R) -> Result<Vec<u8>, InvokeError> {
    codec::encode(out).map_err(|e| InvokeError::EncodeResult(e.to_string()))
}

/// Takes a state value for a call. Used by the macros.
pub fn state<T: Clone + 'static>(states: &States) -> Result<T, InvokeError> {
    states
        .get::<T>()
        .ok_or(InvokeError::MissingState(std::any::type_name::<T>()))
}

/// Adapts an `async fn` to a [`Handler`]. Used by the macros.
pub fn invoke_async<A, R, Fut, F>(args: Bytes, f: F) -> Invocation
where
    A: DeserializeOwned,
    R: Serialize,
    Fut: Future<Output = R> + Send + 'static,
    F: FnOnce(A) -> Fut,
{
    match codec::decode_shared::<A>(&args) {
        Ok(args) => {
            let fut = f(args);
            Invocation::Async(Box::pin(async move { encode_result(&fut.await) }))
        }
        Err(e) => Invocation::Refused(InvokeError::DecodeArgs(e.to_string())),
    }
}

/// Adapts a plain `fn` to a [`Handler`]. Used by the macros.
pub fn invoke_blocking<A, R, F>(args: Bytes, f: F) -> Invocation
where
    A: DeserializeOwned + Send + 'static,
    R: Serialize,
    F: FnOnce(A) -> R + Send + 'static,
{
    match codec::decode_shared::<A>(&args) {
        Ok(args) => Invocation::Blocking(Box::new(move || encode_result(&f(args)))),
        Err(e) => Invocation::Refused(InvokeError::DecodeArgs(e.to_string())),
    }
}

/// Every function registered in this build, by name.
#[derive(Debug)]
pub struct Registry {
    by_name: HashMap<&'static str, Handler>,
    needs: Vec<(&'static str, NeededStates)>,
}

impl Registry {
    /// The registry of this build. Fails if a name is registered twice, naming
    /// both places.
    pub fn global() -> Result<&'static Registry, Error> {
        static GLOBAL: OnceLock<Result<Registry, Error>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| Registry::from_registrations(inventory::iter::<Registration>()))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn from_registrations<'a>(
        regs: impl IntoIterator<Item = &'a Registration>,
    ) -> Result<Registry, Error> {
        let mut by_name = HashMap::new();
        let mut needs = Vec::new();
        let mut seen: HashMap<&'static str, &Registration> = HashMap::new();
        for reg in regs {
            if let Some(first) = seen.insert(reg.name, reg) {
                let (a, b) = {
                    let (mut a, mut b) = (first.location(), reg.location());
                    if a > b {
                        std::mem::swap(&mut a, &mut b);
                    }
                    (a, b)
                };
                return Err(Error::DuplicateFunction {
                    name: reg.name.to_string(),
                    first: a,
                    second: b,
                });
            }
            by_name.insert(reg.name, reg.handler);
            needs.push((reg.name, reg.states));
        }
        needs.sort_by_key(|(name, _)| *name);
        Ok(Registry { by_name, needs })
    }

    /// Looks a function up by name.
    pub fn get(&self, name: &str) -> Option<Handler> {
        self.by_name.get(name).copied()
    }

    /// Looks a function up by name, returning its registered (static) name
    /// too.
    pub fn lookup(&self, name: &str) -> Option<(&'static str, Handler)> {
        self.by_name.get_key_value(name).map(|(k, h)| (*k, *h))
    }

    /// Checks that `states` holds every type of state a registered function
    /// takes, naming the first function and type that is missing.
    pub fn check_states(&self, states: &States) -> Result<(), Error> {
        for (function, needs) in &self.needs {
            if let Some(missing) = needs().into_iter().find(|key| !states.contains(key)) {
                return Err(Error::MissingState {
                    function: function.to_string(),
                    state: missing.name().to_string(),
                });
            }
        }
        Ok(())
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.by_name.keys().copied().collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn double(args: Bytes, _: &States) -> Invocation {
        invoke_async(args, |(x,): (u32,)| async move { x * 2 })
    }

    fn triple(args: Bytes, _: &States) -> Invocation {
        invoke_blocking(args, |(x,): (u32,)| x * 3)
    }

    fn offset(args: Bytes, states: &States) -> Invocation {
        let base = match state::<u64>(states) {
            Ok(base) => base,
            Err(e) => return Invocation::Refused(e),
        };
        invoke_blocking(args, move |(x,): (u64,)| x + base)
    }

    fn needs_u64() -> Vec<StateKey> {
        vec![StateKey::of::<u64>()]
    }

    #[test]
    fn missing_state_is_found_before_any_call() {
        let regs = [Registration::new("m::offset", offset, "x.rs", 1).needs(needs_u64)];
        let registry = Registry::from_registrations(&regs).unwrap();
        let err = registry.check_states(&States::new()).unwrap_err();
        assert!(
            matches!(&err, Error::MissingState { function, state } if function == "m::offset" && state == "u64"),
            "{err:?}"
        );
        let mut states = States::new();
        states.insert(100u64);
        registry.check_states(&states).unwrap();
        let args = Bytes::from(codec::encode(&(1u64,)).unwrap());
        let out = match registry.get("m::offset").unwrap()(args.clone(), &states) {
            Invocation::Blocking(f) => f().unwrap(),
            other => panic!("expected blocking, got {other:?}"),
        };
        assert_eq!(codec::decode::<u64>(&out).unwrap(), 101);
        assert!(matches!(
            registry.get("m::offset").unwrap()(args, &States::new()),
            Invocation::Refused(InvokeError::MissingState("u64"))
        ));
    }

    #[test]
    fn duplicates_are_refused_with_both_locations() {
        let a = Registration::new("m::f", double, "src/a.rs", 3);
        let b = Registration::new("m::f", double, "src/b.rs", 9);
        let err = Registry::from_registrations([&a, &b]).unwrap_err();
        assert!(matches!(
            &err,
            Error::DuplicateFunction { name, first, second }
                if name == "m::f" && first == "src/a.rs:3" && second == "src/b.rs:9"
        ));
        assert!(err.to_string().contains("registered twice"));
    }

    #[test]
    fn invoke_decodes_runs_and_encodes() {
        let regs = [
            Registration::new("m::double", double, "x.rs", 1),
            Registration::new("m::triple", triple, "x.rs", 2),
        ];
        let registry = Registry::from_registrations(&regs).unwrap();
        let args = || Bytes::from(codec::encode(&(21u32,)).unwrap());
        let out = match registry.get("m::double").unwrap()(args(), &States::new()) {
            Invocation::Async(fut) => futures::executor::block_on(fut).unwrap(),
            other => panic!("expected async, got {other:?}"),
        };
        assert_eq!(codec::decode::<u32>(&out).unwrap(), 42);
        let out = match registry.get("m::triple").unwrap()(args(), &States::new()) {
            Invocation::Blocking(f) => f().unwrap(),
            other => panic!("expected blocking, got {other:?}"),
        };
        assert_eq!(codec::decode::<u32>(&out).unwrap(), 63);

        let bad =
            registry.get("m::double").unwrap()(Bytes::from_static(b"\xc1garbage"), &States::new());
        assert!(matches!(
            bad,
            Invocation::Refused(InvokeError::DecodeArgs(_))
        ));
        assert!(registry.get("m::nope").is_none());
    }
}
