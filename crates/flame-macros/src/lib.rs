//! Procedural macros of flame. Use them through the facade crate
//! (package `flame-pattern`, library `flame`): `#[flame::remote]`. The
//! generated code names the facade as the app's manifest does, so an app
//! that renames the dependency writes `#[its_name::remote]`.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{parse_macro_input, FnArg, ItemFn, ReturnType, Type};

/// Registers a function so that pools can run it on a runner.
///
/// An `async fn` runs on the runner's async runtime (its future must be
/// `Send`); a plain `fn` runs on the runner's blocking thread pool, which is
/// the place for CPU-heavy or blocking code (one that proved short, under
/// 200 µs 32 times in a row, runs inline instead, until it runs long).
///
/// The function keeps working as a normal local function. Beside it, the
/// attribute declares a handle type of the same name (in the type namespace,
/// so it does not clash with the function) that implements
/// `flame::RemoteFn`; call it with `flame::call!(pool, name(args..))` or
/// `pool.call::<name>((args..,))`.
///
/// Arguments and the return value must be owned, serializable types: they
/// travel with serde and MessagePack. A parameter of type `State<T>`
/// (`flame::State`) is not sent by the caller: the runner passes a clone
/// of the `T` the app gave flame with `FlameBuilder::state`, and the caller
/// leaves it out (`flame::call!(pool, f(a, b))` for
/// `fn f(State(db): State<Db>, a: A, b: B)`). A parameter written
/// `Vec<u8>`, and a result written `Vec<u8>` or `Result<Vec<u8>, E>`, travel
/// as one block of bytes rather than byte by byte (the types are read as
/// written: an alias such as `io::Result<Vec<u8>>` is not recognised; use
/// `bytes::Bytes` there). A parameter written `Bytes` (a path ending in
/// `Bytes`, which must be `bytes::Bytes`), and a result written `Bytes` or
/// `Result<Bytes, E>`, arrive as slices of the message they came in, not
/// as copies (a type of your own named `Bytes` must be written under
/// another name there, such as an alias). The function may be `async` or
/// not; generics and `self` are not allowed, since a runner finds the code
/// by name.
#[proc_macro_attribute]
pub fn remote(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        let attr = proc_macro2::TokenStream::from(attr);
        return syn::Error::new(attr.span(), "#[flame::remote] takes no arguments")
            .to_compile_error()
            .into();
    }
    let func = parse_macro_input!(item as ItemFn);
    match expand(func) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(func: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let krate = facade_path();
    let sig = &func.sig;
    let name = &sig.ident;
    let vis = &func.vis;
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "#[flame::remote] functions cannot be generic: a runner finds the code by name, so it must be one concrete function",
        ));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new(
            v.span(),
            "#[flame::remote] functions cannot be variadic",
        ));
    }
    // Shipped arguments (types and bindings), state parameters (types and
    // bindings), and what the function is called with, in order.
    let mut types = Vec::new();
    // The types the runner decodes the arguments as.
    let mut wire_types: Vec<Type> = Vec::new();
    // How the parent encodes each argument (`args.<i>`).
    let mut encoded = Vec::new();
    let mut bindings = Vec::new();
    let mut state_types = Vec::new();
    let mut state_bindings = Vec::new();
    let mut call_args = Vec::new();
    for (i, arg) in sig.inputs.iter().enumerate() {
        match arg {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new(
                    r.span(),
                    "#[flame::remote] cannot be used on methods: take the value as an ordinary argument",
                ))
            }
            FnArg::Typed(pt) => {
                reject_borrowed(&pt.ty)?;
                if let Some(inner) = state_type(&pt.ty) {
                    let binding = format_ident!("__flame_state{}", i);
                    call_args.push(quote! { #krate::State(#binding) });
                    state_types.push(inner.clone());
                    state_bindings.push(binding);
                } else {
                    let binding = format_ident!("__flame_arg{}", i);
                    // A `Vec<u8>` decodes as one block of bytes (serde
                    // reads a `Vec<u8>` byte by byte).
                    let index = syn::Index::from(types.len());
                    if is_byte_vec(&pt.ty) {
                        call_args.push(quote! { #binding.into_vec() });
                        wire_types.push(syn::parse_quote!(#krate::__private::ByteBuf));
                        encoded.push(quote! { #krate::__private::ByteSlice::new(&args.#index) });
                    } else if is_bytes(&pt.ty) {
                        // A `Bytes` is a slice of the received call, not a
                        // copy.
                        call_args.push(quote! { #binding.into_bytes() });
                        wire_types.push(syn::parse_quote!(#krate::__private::SharedBytes));
                        encoded.push(quote! { &args.#index });
                    } else {
                        call_args.push(quote! { #binding });
                        wire_types.push((*pt.ty).clone());
                        encoded.push(quote! { &args.#index });
                    }
                    types.push((*pt.ty).clone());
                    bindings.push(binding);
                }
            }
        }
    }
    let output: Type = match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => {
            if let Type::ImplTrait(_) = **ty {
                return Err(syn::Error::new(
                    ty.span(),
                    "#[flame::remote] functions must return a concrete, serializable type, not `impl Trait`",
                ));
            }
            reject_borrowed(ty)?;
            (**ty).clone()
        }
    };
    // A byte-vector result is handed back as a `ByteBuf` (no copy), which
    // encodes as one block of bytes.
    let vec_result = byte_result(&output, is_byte_vec);
    let to_wire = match vec_result {
        ByteResult::No => quote! {},
        ByteResult::Plain => quote! { let out = #krate::__private::ByteBuf::from(out); },
        ByteResult::Ok(_) => quote! { let out = out.map(#krate::__private::ByteBuf::from); },
    };
    // Async functions run on the runner's runtime; plain functions on its
    // blocking pool, where CPU-heavy code belongs (or inline once they
    // proved short, which the runner decides).
    let invoke = if sig.asyncness.is_some() {
        quote! {
            #krate::__private::invoke_async(args, move |(#(#bindings,)*): (#(#wire_types,)*)| async move {
                let out: #output = #name(#(#call_args),*).await;
                #to_wire
                out
            })
        }
    } else {
        quote! {
            #krate::__private::invoke_blocking(args, move |(#(#bindings,)*): (#(#wire_types,)*)| {
                let out: #output = #name(#(#call_args),*);
                #to_wire
                out
            })
        }
    };
    let doc = format!(
        "Remote handle of [`{name}()`]: run it on a pool with `flame::call!(pool, {name}(..))` \
         or `pool.call::<{name}>((..))`."
    );
    // Point type errors (e.g. an argument that is not serializable) at the
    // argument list rather than at the attribute.
    let args_span = if sig.inputs.is_empty() {
        Span::call_site()
    } else {
        sig.inputs.span()
    };
    let args_ty = quote_spanned!(args_span=> (#(#types,)*));
    let out_span = match &sig.output {
        ReturnType::Default => Span::call_site(),
        ReturnType::Type(_, ty) => ty.span(),
    };
    let out_ty = quote_spanned!(out_span=> #output);
    // A `Vec<u8>` result, alone or as the `Ok` of a `Result`, decodes as one
    // block of bytes on the caller's side.
    let any_byte_vec = types.iter().any(is_byte_vec);
    let encode_args = if any_byte_vec {
        quote! {
            fn encode_args(args: &Self::Args, out: &mut ::std::vec::Vec<u8>) -> ::core::result::Result<(), #krate::__private::EncodeError> {
                #krate::__private::encode_into(&(#(#encoded,)*), out)
            }
        }
    } else {
        quote! {}
    };
    // On the caller's side, a `Vec<u8>` result decodes as one block of
    // bytes (`ByteBuf`), and a `Bytes` result as a slice of the reply
    // (`SharedBytes`), alone or as the `Ok` of a `Result`.
    let bytes_result = byte_result(&output, is_bytes);
    let (shape, wire, into) = match &vec_result {
        ByteResult::No => (&bytes_result, quote!(SharedBytes), quote!(into_bytes)),
        _ => (&vec_result, quote!(ByteBuf), quote!(into_vec)),
    };
    let decode_output = match shape {
        ByteResult::No => quote! {},
        ByteResult::Plain => quote! {
            fn decode_output(bytes: &[u8]) -> ::core::result::Result<Self::Output, #krate::__private::DecodeError> {
                #krate::__private::decode::<#krate::__private::#wire>(bytes)
                    .map(#krate::__private::#wire::#into)
            }
        },
        ByteResult::Ok(err) => quote! {
            fn decode_output(bytes: &[u8]) -> ::core::result::Result<Self::Output, #krate::__private::DecodeError> {
                #krate::__private::decode::<::core::result::Result<#krate::__private::#wire, #err>>(bytes)
                    .map(|r| r.map(#krate::__private::#wire::#into))
            }
        },
    };
    Ok(quote! {
        #func

        #[doc = #doc]
        #[allow(non_camel_case_types)]
        #vis struct #name {
            _not_constructible: (),
        }

        impl #krate::RemoteFn for #name {
            const NAME: &'static str = ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name));
            type Args = #args_ty;
            type Output = #out_ty;
            #decode_output
            #encode_args
        }

        const _: () = {
            fn __flame_handler(
                args: #krate::__private::Bytes,
                states: &#krate::__private::States,
            ) -> #krate::__private::Invocation {
                let _ = states;
                #(
                    let #state_bindings: #state_types = match #krate::__private::state::<#state_types>(states) {
                        ::core::result::Result::Ok(value) => value,
                        ::core::result::Result::Err(e) => return #krate::__private::Invocation::Refused(e),
                    };
                )*
                #invoke
            }
            fn __flame_states() -> ::std::vec::Vec<#krate::__private::StateKey> {
                ::std::vec![#(#krate::__private::StateKey::of::<#state_types>()),*]
            }
            #krate::__private::inventory::submit! {
                #krate::__private::Registration::new(
                    <#name as #krate::RemoteFn>::NAME,
                    __flame_handler,
                    ::core::file!(),
                    ::core::line!(),
                )
                .needs(__flame_states)
            }
        };
    })
}

/// The package of the facade crate, whose library is `flame`.
const FACADE_PACKAGE: &str = "flame-pattern";

/// The path of the facade crate as the calling crate's manifest names it:
/// `::fire` for `fire = { package = "flame-pattern", .. }`, else `::flame`.
///
/// Without a rename the dependency's name is the package's, which
/// proc-macro-crate spells `flame_pattern`; the library is `flame`, though,
/// so that answer means `::flame` (as does a manifest that cannot be read,
/// and the facade's own doc tests, which proc-macro-crate calls `Itself`).
fn facade_path() -> proc_macro2::TokenStream {
    use proc_macro_crate::{crate_name, FoundCrate};
    match crate_name(FACADE_PACKAGE) {
        Ok(FoundCrate::Name(name)) if name != FACADE_PACKAGE.replace('-', "_") => {
            let name = syn::Ident::new(&name, Span::call_site());
            quote!(::#name)
        }
        _ => quote!(::flame),
    }
}

/// `T` when `ty` is `State<T>` (or a path ending in `State<T>`, such as
/// `flame::State<T>`): a parameter taken from the app's state.
fn state_type(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = ty else {
        return None;
    };
    let last = path.path.segments.last()?;
    if last.ident != "State" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first() {
        Some(syn::GenericArgument::Type(inner)) if args.args.len() == 1 => Some(inner),
        _ => None,
    }
}

fn reject_borrowed(ty: &Type) -> syn::Result<()> {
    if let Type::Reference(r) = ty {
        return Err(syn::Error::new(
            r.span(),
            "#[flame::remote] arguments and results are sent over the network, so they must be owned: use e.g. `String` instead of `&str`, `Vec<T>` instead of `&[T]`",
        ));
    }
    Ok(())
}

/// Whether `ty` is written `Vec<u8>` (or a path ending in `Vec<u8>`).
fn is_byte_vec(ty: &Type) -> bool {
    let Some(inner) = single_generic(ty, "Vec") else {
        return false;
    };
    matches!(inner, Type::Path(p) if p.qself.is_none() && p.path.is_ident("u8"))
}

/// The only generic type argument of `ty` when `ty` is `<name><T>`.
fn single_generic<'a>(ty: &'a Type, name: &str) -> Option<&'a Type> {
    let args = generics_of(ty, name)?;
    match (args.len(), args.first()) {
        (1, Some(syn::GenericArgument::Type(inner))) => Some(inner),
        _ => None,
    }
}

fn generics_of<'a>(
    ty: &'a Type,
    name: &str,
) -> Option<&'a syn::punctuated::Punctuated<syn::GenericArgument, syn::token::Comma>> {
    let Type::Path(path) = ty else {
        return None;
    };
    let last = path.path.segments.last()?;
    if last.ident != name {
        return None;
    }
    match &last.arguments {
        syn::PathArguments::AngleBracketed(args) => Some(&args.args),
        _ => None,
    }
}

/// How a result type holds a byte vector (or a `Bytes`).
enum ByteResult<'a> {
    No,
    /// `Vec<u8>` (or `Bytes`).
    Plain,
    /// `Result<Vec<u8>, E>` (or `Result<Bytes, E>`), with `E`.
    Ok(&'a Type),
}

/// Whether `ty` is written `Bytes` (or a path ending in `Bytes`, such as
/// `bytes::Bytes`).
fn is_bytes(ty: &Type) -> bool {
    let Type::Path(path) = ty else {
        return false;
    };
    path.qself.is_none()
        && path
            .path
            .segments
            .last()
            .is_some_and(|last| last.ident == "Bytes" && last.arguments.is_empty())
}

/// Whether a result type is `T`, or `Result<T, E>`, for a `T` that `is`
/// picks.
fn byte_result(ty: &Type, is: fn(&Type) -> bool) -> ByteResult<'_> {
    if is(ty) {
        return ByteResult::Plain;
    }
    match generics_of(ty, "Result").map(|a| a.iter().collect::<Vec<_>>()) {
        Some(args) => match args[..] {
            [syn::GenericArgument::Type(ok), syn::GenericArgument::Type(err)] if is(ok) => {
                ByteResult::Ok(err)
            }
            _ => ByteResult::No,
        },
        None => ByteResult::No,
    }
}
