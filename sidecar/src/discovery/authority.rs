//! The `default_dns` template. (Authorities are parsed by the proxy: `proxy::route`.)

use super::resolver::LookupError;

/// Fills `{service}` and `{namespace}` into a `default_dns` template and splits off the port.
pub fn expand_template(
    template: &str,
    service: &str,
    namespace: &str,
) -> Result<(String, u16), LookupError> {
    let filled = template
        .replace("{service}", service)
        .replace("{namespace}", namespace);
    crate::config::split_host_port(&filled).ok_or_else(|| {
        LookupError::Config(format!(
            "default_dns `{template}` gives `{filled}`, not HOST:PORT"
        ))
    })
}
