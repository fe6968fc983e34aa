//! Periodic `Registry.Announce` to the gateway, so that it knows this node
//! is alive, what it offers and when it restarted (a new boot id).

use std::sync::Arc;
use std::time::Duration;

use svcbroker_proto::auth::BearerToken;
use svcbroker_proto::v1::AnnounceRequest;
use svcbroker_proto::v1::registry_client::RegistryClient;
use tokio::sync::watch;
use tonic::transport::Endpoint;

use crate::node::Node;
use crate::supervisor::stopped;

/// Announces `node` (with `token`) to the Registry at `url` now and then at the interval
/// the gateway asks for (`fallback` until it answers), until `stop` turns
/// true. An outage is logged once when it starts and once when it ends.
pub(crate) async fn announce_loop(
    node: Arc<Node>,
    url: String,
    token: BearerToken,
    fallback: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let endpoint = match Endpoint::from_shared(url.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10)),
        Err(e) => {
            tracing::warn!(gateway_url = %url, error = %e, "invalid gateway url: not announcing");
            return;
        }
    };
    // Lazy, so a gateway that starts after the node is picked up by the
    // next tick instead of failing startup.
    let mut client = RegistryClient::new(token.wrap(endpoint.connect_lazy()));
    let mut failing = false;
    let mut announced = false;
    loop {
        let interval = match client
            .announce(AnnounceRequest {
                node: Some(node.info()),
            })
            .await
        {
            Ok(resp) => {
                let resp = resp.into_inner();
                if failing || !announced {
                    tracing::info!(gateway_url = %url, new_boot = resp.new_boot, "announced to gateway");
                }
                failing = false;
                announced = true;
                if resp.interval_ms == 0 {
                    fallback
                } else {
                    Duration::from_millis(u64::from(resp.interval_ms))
                }
            }
            Err(status) => {
                if !failing {
                    tracing::warn!(
                        gateway_url = %url,
                        code = ?status.code(),
                        error = %status.message(),
                        "cannot announce to gateway; retrying quietly until it works"
                    );
                }
                failing = true;
                fallback
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}
