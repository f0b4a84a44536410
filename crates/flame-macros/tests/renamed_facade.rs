//! The macros follow the app's name for the facade: an app that depends on
//! it as `fire = { package = "flame-pattern", .. }` has no crate `flame`,
//! so code that named `::flame` would not compile.

#[test]
fn an_app_that_renames_the_facade_compiles_and_runs() {
    let t = trybuild::TestCases::new();
    t.pass("tests/renamed/app.rs");
}
