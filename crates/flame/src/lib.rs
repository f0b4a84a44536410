//! # flame
//!
//! The FLAME pattern for Rust: wrap a block of your app's code in a call, and
//! it runs on a short-lived copy of the same app, booted on demand, with the
//! result coming back to the caller. Pools of runners grow from zero to a
//! maximum under load and idle back down. No queues, no glue services, no
//! rewrite.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Video { url: String }
//!
//! // A named function, callable on any pool.
//! #[flame::remote]
//! async fn thumbnail_count(video: Video, interval: u32) -> usize {
//!     video.url.len() / interval as usize
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), flame::Error> {
//!     // In a runner this serves calls and exits; in the parent it connects.
//!     let flame = flame::init().await?;
//!     let pool = flame.pool("thumbs").max(4).start().await?;
//!
//!     let video = Video { url: "https://example.invalid/v.mp4".into() };
//!     let n = flame::call!(pool, thumbnail_count(video, 5)).await?;
//!
//!     // Or an inline block: the listed variables are shipped as arguments;
//!     // using any other local variable in the block is a compile error.
//!     // (Plain blocks run on the runner's blocking pool; write
//!     // `async |..| { .. }` for a block that awaits.)
//!     let interval = 5u32;
//!     let frames = flame::call!(pool, |interval: u32| -> Vec<u32> {
//!         (0..60).step_by(interval as usize).collect()
//!     })
//!     .await?;
//!     println!("{n} thumbnails, frames at {frames:?}");
//!     Ok(())
//! }
//! ```
//!
//! The same binary is the runner: a pool boots runners by starting this
//! executable with `FLAME_PARENT` in its environment, and [`init`] turns such
//! a process into a runner. A parent that must do setup of its own before
//! connecting (start its own nats-server, say) calls [`serve_if_runner`]
//! first and [`FlameBuilder::connect`] after that setup. [`Flame::close`]
//! closes the connection; [`Pool::runners`] lists a pool's runners. Code is found by registered name, and parent and
//! runner must be the same build, checked on every call.
//!
//! Pools are this parent's own by default. With [`PoolBuilder::shared`], every
//! parent on the NATS server that uses the pool's name shares one set of
//! runners, with limits that hold for the whole fleet (coordinated through a
//! JetStream KV bucket; see the README). Runners are local processes by
//! default ([`LocalBackend`]); the `flame-fly` crate boots them as Fly
//! Machines, the `flame-k8s` crate as Kubernetes Pods, the `flame-docker`
//! crate as Docker containers.
//!
//! Cargo features: `fly` (the Fly Machines backend as `flame::fly`), `k8s`
//! (the Kubernetes backend as `flame::k8s`), `docker` (the Docker backend
//! as `flame::docker`) and `otel` (spans exported over OpenTelemetry's
//! OTLP, `flame::otel::layer`).
//! [`runner_log_layer`] sends a private pool's runner log lines to the
//! parent (with `PoolBuilder::forward_runner_logs`). Set up the tracing
//! subscriber, with either layer, before [`init`]: in a runner `init`
//! serves and does not return.

#![warn(missing_docs)]
// On docs.rs: mark the items that need a feature (`fly`, `otel`).
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use flame_core::{
    backend, channel, Backend, BootSpec, Booted, BoxError, Error, ErrorKind, LocalBackend, Reader,
    RemoteError, RemoteFn, Result, Sender, Source, State, StopRunner, Stream,
};
pub use flame_macros::remote;

/// The Docker backend (cargo feature `docker`): runners as containers of
/// the parent's image. See `flame_docker::DockerBackend`.
#[cfg(feature = "docker")]
pub use flame_docker as docker;
/// The Fly Machines backend (cargo feature `fly`): runners as Machines of
/// your app. See `flame_fly::FlyBackend`.
#[cfg(feature = "fly")]
pub use flame_fly as fly;
/// The Kubernetes backend (cargo feature `k8s`): runners as Pods made from
/// the parent's own Pod. See `flame_k8s::K8sBackend`.
#[cfg(feature = "k8s")]
pub use flame_k8s as k8s;
/// OpenTelemetry export (cargo feature `otel`); see the README's "Traces".
#[cfg(feature = "otel")]
pub use flame_nats::otel;
pub use flame_nats::{
    build_id, embedded, env, init, ops, parent, runner_log_layer, serve_if_runner, CallOptions,
    Child, ChildExit, ChildOptions, Flame, FlameBuilder, ParentInfo, Pool, PoolBuilder, PoolChange,
    PoolConfig, PoolStatus, RunnerInfo, RunnerLogLayer, RunnerState,
};

/// Runs a function or an inline block on a pool and waits for the result.
///
/// Three forms:
///
/// - `flame::call!(pool, name(arg1, arg2))` calls a `#[flame::remote]`
///   function (leave out its `State<T>` parameters: the runner fills them);
/// - `flame::call!(pool, |a: A, b: B| -> R { ... })` lifts a plain block into
///   a registered function that runs on the runner's blocking thread pool:
///   the place for CPU-heavy or blocking code;
/// - `flame::call!(pool, async |a: A| -> R { ... })` does the same for a block
///   that awaits; it runs on the runner's async runtime.
///
/// The listed variables are taken from the enclosing scope (moved) and
/// shipped as the block's arguments; the block may use nothing else from its
/// scope, which the compiler enforces. The return type defaults to `()`.
///
/// An inline block gets app state (see [`FlameBuilder::state`]) through a
/// `state(..)` clause before it: the runner's own value of each listed type,
/// cloned, under the given name. Nothing of it is shipped.
///
/// ```ignore
/// flame::call!(pool, state(db: Db), async |id: u64| -> Result<(), String> {
///     db.insert(id).await
/// })
/// ```
///
/// Evaluates to a future of `Result<R, flame::Error>`.
#[macro_export]
macro_rules! call {
    ($pool:expr, state($($s:ident : $st:ty),+ $(,)?), async $(move)? || $(-> $ret:ty)? $body:block) => {
        $crate::__flame_inline!(call, async, $pool, [$($s : $st),+] () -> ($($ret)?) $body)
    };
    ($pool:expr, state($($s:ident : $st:ty),+ $(,)?), async $(move)? |$($arg:ident : $ty:ty),+ $(,)?| $(-> $ret:ty)? $body:block) => {
        $crate::__flame_inline!(call, async, $pool, [$($s : $st),+] ($($arg : $ty),+) -> ($($ret)?) $body)
    };
    ($pool:expr, state($($s:ident : $st:ty),+ $(,)?), $(move)? || $(-> $ret:ty)? $body:block) => {
        $crate::__flame_inline!(call, blocking, $pool, [$($s : $st),+] () -> ($($ret)?) $body)
    };
    ($pool:expr, state($($s:ident : $st:ty),+ $(,)?), $(move)? |$($arg:ident : $ty:ty),+ $(,)?| $(-> $ret:ty)? $body:block) => {
        $crate::__flame_inline!(call, blocking, $pool, [$($s : $st),+] ($($arg : $ty),+) -> ($($ret)?) $body)
    };
    ($pool:expr, async $(move)? || $(-> $ret:ty)? $body:block) => {
        $crate::__flame_inline!(call, async, $pool, [] () -> ($($ret)?) $body)
    };
    ($pool:expr, async $(move)? |$($arg:ident : $ty:ty),+ $(,)?| $(-> $ret:ty)? $body:block) => {
        $crate::__flame_inline!(call, async, $pool, [] ($($arg : $ty),+) -> ($($ret)?) $body)
    };
    ($pool:expr, $(move)? || $(-> $ret:ty)? $body:block) => {
        $crate::__flame_inline!(call, blocking, $pool, [] () -> ($($ret)?) $body)
    };
    ($pool:expr, $(move)? |$($arg:ident : $ty:ty),+ $(,)?| $(-> $ret:ty)? $body:block) => {
        $crate::__flame_inline!(call, blocking, $pool, [] ($($arg : $ty),+) -> ($($ret)?) $body)
    };
    ($pool:expr, $($func:ident)::+ ( $($a:expr),* $(,)? )) => {
        ($pool).call::<$($func)::+>(($($a,)*))
    };
}

/// Runs a function or an inline block on a pool without waiting for it.
///
/// Same forms as [`call!`] (including the `state(..)` clause). Evaluates to
/// `Result<(), flame::Error>` at once; the work then finds or boots a runner
/// on its own, and its failures are logged and counted on the runner.
#[macro_export]
macro_rules! cast {
    ($pool:expr, state($($s:ident : $st:ty),+ $(,)?), async $(move)? || $body:block) => {
        $crate::__flame_inline!(cast, async, $pool, [$($s : $st),+] () -> () $body)
    };
    ($pool:expr, state($($s:ident : $st:ty),+ $(,)?), async $(move)? |$($arg:ident : $ty:ty),+ $(,)?| $body:block) => {
        $crate::__flame_inline!(cast, async, $pool, [$($s : $st),+] ($($arg : $ty),+) -> () $body)
    };
    ($pool:expr, state($($s:ident : $st:ty),+ $(,)?), $(move)? || $body:block) => {
        $crate::__flame_inline!(cast, blocking, $pool, [$($s : $st),+] () -> () $body)
    };
    ($pool:expr, state($($s:ident : $st:ty),+ $(,)?), $(move)? |$($arg:ident : $ty:ty),+ $(,)?| $body:block) => {
        $crate::__flame_inline!(cast, blocking, $pool, [$($s : $st),+] ($($arg : $ty),+) -> () $body)
    };
    ($pool:expr, async $(move)? || $body:block) => {
        $crate::__flame_inline!(cast, async, $pool, [] () -> () $body)
    };
    ($pool:expr, async $(move)? |$($arg:ident : $ty:ty),+ $(,)?| $body:block) => {
        $crate::__flame_inline!(cast, async, $pool, [] ($($arg : $ty),+) -> () $body)
    };
    ($pool:expr, $(move)? || $body:block) => {
        $crate::__flame_inline!(cast, blocking, $pool, [] () -> () $body)
    };
    ($pool:expr, $(move)? |$($arg:ident : $ty:ty),+ $(,)?| $body:block) => {
        $crate::__flame_inline!(cast, blocking, $pool, [] ($($arg : $ty),+) -> () $body)
    };
    ($pool:expr, $($func:ident)::+ ( $($a:expr),* $(,)? )) => {
        ($pool).cast::<$($func)::+>(($($a,)*))
    };
}

/// Starts a `#[flame::remote]` function as a long-lived child on a pool
/// and returns its [`Child`] handle at once:
/// `flame::place_child!(pool, name(args..))`. Evaluates to
/// `Result<Child<R>, flame::Error>`. See [`Pool::place_child`].
#[macro_export]
macro_rules! place_child {
    ($pool:expr, $($func:ident)::+ ( $($a:expr),* $(,)? )) => {
        ($pool).place_child::<$($func)::+>(($($a,)*))
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __flame_inline {
    // An empty return type means `()`.
    ($method:ident, $kind:ident, $pool:expr, [$($s:ident : $st:ty),*] ($($arg:ident : $ty:ty),*) -> () $body:block) => {
        $crate::__flame_inline!($method, $kind, $pool, [$($s : $st),*] ($($arg : $ty),*) -> (()) $body)
    };
    ($method:ident, $kind:ident, $pool:expr, [$($s:ident : $st:ty),*] ($($arg:ident : $ty:ty),*) -> ($ret:ty) $body:block) => {{
        // A nested fn item cannot capture local variables (error E0434), so a
        // variable used in the block but not listed fails to compile.
        #[allow(non_camel_case_types)]
        struct __flame_block;
        impl $crate::RemoteFn for __flame_block {
            const NAME: &'static str = ::core::concat!(
                ::core::module_path!(), "::{block@", ::core::line!(), ":", ::core::column!(), "}"
            );
            type Args = ($($ty,)*);
            type Output = $ret;
        }
        $crate::__flame_inline!(@fn $kind [$($s : $st),*] ($($arg : $ty),*) -> $ret $body);
        fn __flame_states() -> ::std::vec::Vec<$crate::__private::StateKey> {
            ::std::vec![$($crate::__private::StateKey::of::<$st>()),*]
        }
        $crate::__private::inventory::submit! {
            $crate::__private::Registration::new(
                <__flame_block as $crate::RemoteFn>::NAME,
                __flame_handler,
                ::core::file!(),
                ::core::line!(),
            )
            .needs(__flame_states)
        }
        ($pool).$method::<__flame_block>(($($arg,)*))
    }};
    (@fn async [$($s:ident : $st:ty),*] ($($arg:ident : $ty:ty),*) -> $ret:ty $body:block) => {
        async fn __flame_block_fn($($arg: $ty,)* $($s: $st),*) -> $ret $body
        $crate::__flame_inline!(@handler invoke_async [$($s : $st),*] ($($arg : $ty),*));
    };
    (@fn blocking [$($s:ident : $st:ty),*] ($($arg:ident : $ty:ty),*) -> $ret:ty $body:block) => {
        fn __flame_block_fn($($arg: $ty,)* $($s: $st),*) -> $ret $body
        $crate::__flame_inline!(@handler invoke_blocking [$($s : $st),*] ($($arg : $ty),*));
    };
    // The registered entry point: takes the block's state, decodes its
    // arguments, and calls it.
    (@handler $invoke:ident [$($s:ident : $st:ty),*] ($($arg:ident : $ty:ty),*)) => {
        fn __flame_handler(
            args: $crate::__private::Bytes,
            states: &$crate::__private::States,
        ) -> $crate::__private::Invocation {
            let _ = states;
            $(
                let $s: $st = match $crate::__private::state::<$st>(states) {
                    ::core::result::Result::Ok(value) => value,
                    ::core::result::Result::Err(e) => return $crate::__private::Invocation::Refused(e),
                };
            )*
            $crate::__private::$invoke(args, move |($($arg,)*): ($($ty,)*)| __flame_block_fn($($arg,)* $($s),*))
        }
    };
}

/// Used by the macros; not public API.
#[doc(hidden)]
pub mod __private {
    pub use bytes::Bytes;
    pub use flame_core::codec::{decode, encode_into, DecodeError, EncodeError};
    pub use flame_core::inventory;
    pub use flame_core::registry::{
        invoke_async, invoke_blocking, state, Invocation, Registration,
    };
    pub use flame_core::state::{StateKey, States};
    pub use serde_bytes::{ByteBuf, Bytes as ByteSlice};
}
