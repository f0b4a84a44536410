// The crate's documentation is a markdown file, so that it reads as a
// document; its examples still run as doctests.
#![doc = include_str!("../docs/crate.md")]
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

#[doc = include_str!("../docs/call.md")]
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
    pub use flame_core::codec::{decode, encode_into, DecodeError, EncodeError, SharedBytes};
    pub use flame_core::inventory;
    pub use flame_core::registry::{
        invoke_async, invoke_blocking, state, Invocation, Registration,
    };
    pub use flame_core::state::{StateKey, States};
    pub use serde_bytes::{ByteBuf, Bytes as ByteSlice};
}
