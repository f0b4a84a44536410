//! Where unset settings come from: the variables Fly sets inside every
//! Machine (and the API token), and the default Machines API.

/// Default Machines API endpoint.
pub const DEFAULT_API_URL: &str = "https://api.machines.dev";

/// Environment variable with the API token.
pub const TOKEN_ENV: &str = "FLY_API_TOKEN";
/// Environment variable with the app name (set inside every Machine).
pub const APP_ENV: &str = "FLY_APP_NAME";
/// Environment variable with the running image (set inside every Machine).
pub const IMAGE_ENV: &str = "FLY_IMAGE_REF";
/// Environment variable with the region (set inside every Machine).
pub const REGION_ENV: &str = "FLY_REGION";
/// Environment variable with the Machines API host, as Fly's own tools
/// read it: a URL (`https://api.machines.dev`) or a bare `host:port`
/// (`_api.internal:4280`, spoken over plain HTTP inside Fly's private
/// network).
pub const API_HOST_ENV: &str = "FLY_API_HOSTNAME";
