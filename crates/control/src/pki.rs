//! First-start bootstrap of the cluster's credentials, kept in the data
//! directory: the CA, the server certificate, the join token, and the
//! admin client config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_client::ClientConfig;
use skiff_client::config::write_private;
use skiff_identity::{Ca, Issued, Principal, new_token};
use time::OffsetDateTime;

use crate::ServerError;

const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// The credentials a running server uses.
#[derive(Debug)]
pub struct Pki {
    pub ca: Ca,
    pub server: Issued,
    pub join_token: String,
    /// The admin's client config (server URL filled in by the caller).
    pub admin: ClientConfig,
    /// Whether this start created the cluster.
    pub created: bool,
}

fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

fn io(path: &Path, e: std::io::Error) -> ServerError {
    ServerError::Setup(format!("{}: {e}", path.display()))
}

/// Loads the cluster's credentials, creating them on first start. The
/// server certificate is issued anew each start for the current `hosts`.
pub fn load_or_create(
    data_dir: &Path,
    hosts: &[String],
    now: OffsetDateTime,
) -> Result<Pki, ServerError> {
    let dir = pki_dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let token_path = data_dir.join("join-token");
    let admin_path = data_dir.join("admin.config");
    let created = !ca_crt.exists();
    let ca = if created {
        let ca =
            Ca::generate("skiff", now, 10 * YEAR).map_err(|e| ServerError::Setup(e.to_string()))?;
        write_private(&ca_key, ca.key_pem().as_bytes()).map_err(|e| io(&ca_key, e))?;
        std::fs::write(&ca_crt, ca.cert_pem()).map_err(|e| io(&ca_crt, e))?;
        ca
    } else {
        let cert = std::fs::read_to_string(&ca_crt).map_err(|e| io(&ca_crt, e))?;
        let key = std::fs::read_to_string(&ca_key).map_err(|e| io(&ca_key, e))?;
        Ca::from_pem(&cert, &key)
            .map_err(|e| ServerError::Setup(format!("{}: {e}", ca_crt.display())))?
    };
    let join_token = if token_path.exists() {
        std::fs::read_to_string(&token_path)
            .map_err(|e| io(&token_path, e))?
            .trim()
            .to_string()
    } else {
        let token = new_token();
        write_private(&token_path, format!("{token}\n").as_bytes())
            .map_err(|e| io(&token_path, e))?;
        token
    };
    let server = ca
        .issue_server(hosts, now, YEAR)
        .map_err(|e| ServerError::Setup(e.to_string()))?;
    let admin = if admin_path.exists() {
        ClientConfig::load(&admin_path).map_err(|e| ServerError::Setup(e.to_string()))?
    } else {
        let issued = ca
            .issue_client(
                &Principal::Admin {
                    name: "admin".into(),
                },
                now,
                YEAR,
            )
            .map_err(|e| ServerError::Setup(e.to_string()))?;
        let admin = ClientConfig {
            server: "https://127.0.0.1".into(),
            certificate_authority: ca.cert_pem().to_string(),
            client_certificate: Some(issued.cert_pem),
            client_key: Some(issued.key_pem),
            token: None,
            node: None,
        };
        admin.save(&admin_path).map_err(|e| io(&admin_path, e))?;
        admin
    };
    Ok(Pki {
        ca,
        server,
        join_token,
        admin,
        created,
    })
}

/// Writes the admin config with the server's address, in the data
/// directory and at `extra` (the CLI's default location).
pub fn write_admin_config(
    pki: &Pki,
    data_dir: &Path,
    server_url: &str,
    extra: Option<&Path>,
) -> Result<ClientConfig, ServerError> {
    let config = ClientConfig {
        server: server_url.to_string(),
        ..pki.admin.clone()
    };
    let admin_path = data_dir.join("admin.config");
    config.save(&admin_path).map_err(|e| io(&admin_path, e))?;
    if let Some(path) = extra {
        config.save(path).map_err(|e| io(path, e))?;
    }
    Ok(config)
}
