//! The current TLS configuration of a listener, re-read when its files change.
//!
//! Kubernetes updates a Secret volume by writing the new files into a fresh directory and
//! swapping a symlink, so the paths stay the same and only their contents change. The store
//! reads the files every `--tls-reload-interval` (and on SIGHUP) and rebuilds the configuration
//! when their bytes differ from the last ones seen. New connections get the new certificate;
//! open connections keep the configuration they started with. A bad new set of files (a key
//! that does not match, a half-written file) keeps the old configuration, logs an error once per
//! distinct content and counts `echo_tls_reloads_total{result="error"}`; a rotation that writes
//! the files one after another converges at the next check.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;

use super::settings::{self, TlsSettings};
use super::x509::Validity;
use crate::telemetry::TlsMetrics;

/// A listener's TLS configuration, current and reloadable.
pub struct CertStore {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
    /// The file contents last looked at (loaded, or refused).
    seen: Mutex<Vec<Vec<u8>>>,
    metrics: TlsMetrics,
}

impl CertStore {
    /// Load the configuration for the first time; an error here is a startup error. An
    /// expired or not-yet-valid certificate is a warning, not a refusal.
    pub fn load(settings: TlsSettings, metrics: TlsMetrics) -> Result<Arc<Self>, String> {
        let files = settings::read_files(&settings)?;
        let loaded = settings::build(&settings, &files)?;
        report_validity(&metrics, loaded.validity);
        Ok(Arc::new(CertStore {
            settings,
            current: RwLock::new(loaded.server),
            seen: Mutex::new(files),
            metrics,
        }))
    }

    /// The configuration for a new connection.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The settings this store was built from.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// The metrics of this listener.
    pub fn metrics(&self) -> &TlsMetrics {
        &self.metrics
    }

    /// Re-read the files; rebuild if they changed. Returns whether the configuration changed.
    pub fn reload_if_changed(&self) -> bool {
        let files = match settings::read_files(&self.settings) {
            Ok(files) => files,
            Err(err) => {
                // A file missing mid-rotation: keep serving, try again at the next check.
                tracing::debug!(error = %err, "TLS files not readable; keeping the current certificate");
                return false;
            }
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == files {
            return false;
        }
        let result = settings::build(&self.settings, &files);
        *seen = files;
        drop(seen);
        match result {
            Ok(loaded) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded.server;
                report_validity(&self.metrics, loaded.validity);
                self.metrics.reloads_ok.inc();
                tracing::info!(cert = %self.settings.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(err) => {
                self.metrics.reloads_error.inc();
                tracing::error!(error = %err, "TLS files changed but cannot be used; keeping the current certificate");
                false
            }
        }
    }

    /// Check the files every reload interval, forever.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.reload_if_changed();
        }
    }
}

/// Set the expiry gauge and warn about a certificate that is not valid now.
fn report_validity(metrics: &TlsMetrics, validity: Option<Validity>) {
    let Some(validity) = validity else {
        tracing::warn!(
            "could not read the certificate's validity period; the expiry gauge is not set"
        );
        return;
    };
    metrics.expiry.set(validity.not_after);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if now > validity.not_after {
        tracing::warn!(
            not_after = validity.not_after,
            "the TLS certificate has expired; serving it anyway"
        );
    } else if now < validity.not_before {
        tracing::warn!(
            not_before = validity.not_before,
            "the TLS certificate is not valid yet; serving it anyway"
        );
    }
}
