//! Wiring, the only writer of the index: watches feed the index (each one a trimmed reflector:
//! pods become [`PodInfo`]s and nodes [`NodeInfo`]s, namespaces are watched as metadata only),
//! the triggers its writes return reach exactly the affected objects, and the two controllers
//! run once every index has its initial list. Reconcilers only read the index.
//!
//! The CRDs are read through `DeserializeGuard`, so an object this version cannot decode is
//! reported on its own and never stalls a watch.
//!
//! [`PodInfo`]: crate::model::PodInfo
//! [`NodeInfo`]: crate::model::NodeInfo

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt, channel::mpsc};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Preconditions};
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use stratum_api::{NodeClock, TenantTimePolicy, TimeService};
use tokio::sync::oneshot;

use super::{Context, TriggerSenders, lock, tenant, time_service};
use crate::freshness::max_sweep_interval;
use crate::index::{Index, Triggers};
use crate::model::NodeInfo;
use crate::names;
use crate::owned::ChildKind;

type Key = (Option<String>, String);

/// Applies watch events of one kind to the index and forwards the triggers. Relists (Init …
/// InitDone) delete whatever the new list no longer holds. `synced` fires after the first list.
#[allow(clippy::too_many_arguments)]
pub async fn feed<K>(
    kind: &'static str,
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    index: Arc<Mutex<Index>>,
    senders: TriggerSenders,
    key: fn(&K) -> Key,
    apply: fn(&mut Index, &K) -> Triggers,
    delete: fn(&mut Index, Option<&str>, &str) -> Triggers,
    synced: oneshot::Sender<()>,
) {
    let mut known: HashSet<Key> = HashSet::new();
    let mut relist: Option<HashSet<Key>> = None;
    let mut synced = Some(synced);
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let mut triggers = Triggers::default();
        match event {
            Ok(watcher::Event::Apply(obj)) => {
                known.insert(key(&obj));
                triggers = apply(&mut lock(&index), &obj);
            }
            Ok(watcher::Event::Delete(obj)) => {
                let k = key(&obj);
                known.remove(&k);
                triggers = delete(&mut lock(&index), k.0.as_deref(), &k.1);
            }
            Ok(watcher::Event::Init) => relist = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(obj)) => {
                let k = key(&obj);
                relist.get_or_insert_with(HashSet::new).insert(k.clone());
                known.insert(k);
                triggers = apply(&mut lock(&index), &obj);
            }
            Ok(watcher::Event::InitDone) => {
                let seen = relist.take().unwrap_or_default();
                let mut idx = lock(&index);
                for gone in known.difference(&seen) {
                    triggers.extend(delete(&mut idx, gone.0.as_deref(), &gone.1));
                }
                drop(idx);
                known = seen;
                if let Some(tx) = synced.take() {
                    tracing::info!(kind, objects = known.len(), "index synced");
                    let _ = tx.send(());
                }
            }
            Err(e) => tracing::warn!(kind, error = %e, "watch failed; retrying with backoff"),
        }
        if !triggers.is_empty() {
            senders.send(triggers);
        }
    }
}

fn key_of<K: ResourceExt>(obj: &K) -> Key {
    (obj.namespace(), obj.name_any())
}

fn guard_key<K: kube::Resource>(obj: &DeserializeGuard<K>) -> Key {
    match &obj.0 {
        Ok(o) => (
            o.meta().namespace.clone(),
            o.meta().name.clone().unwrap_or_default(),
        ),
        Err(invalid) => (
            invalid.metadata.namespace.clone(),
            invalid.metadata.name.clone().unwrap_or_default(),
        ),
    }
}

/// A controller's own trigger stream: none. Every reconcile comes from the index's triggers
/// (every object is triggered when the feed first lists it), from a requeue, or from an owned
/// object.
fn index_only<K>() -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Send + 'static,
{
    futures::stream::pending()
}

/// Runs the feeders and, once every index is synced, both controllers, until `shutdown`.
pub async fn run(
    client: Client,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (ts_tx, ts_rx) = mpsc::unbounded();
    let (tenant_tx, tenant_rx) = mpsc::unbounded();
    let senders = TriggerSenders {
        time_services: ts_tx,
        tenants: tenant_tx,
    };
    // A second wiring of the same context would find the first one's senders: keep those.
    let _ = ctx.triggers.set(senders.clone());
    let index = ctx.index.clone();
    let mut synced = Vec::new();
    let cfg = watcher::Config::default;

    macro_rules! spawn_feed {
        ($kind:literal, $stream:expr, $key:expr, $apply:expr, $delete:expr) => {{
            let (tx, rx) = oneshot::channel();
            synced.push(rx);
            tokio::spawn(feed(
                $kind,
                $stream.default_backoff(),
                index.clone(),
                senders.clone(),
                $key,
                $apply,
                $delete,
                tx,
            ));
        }};
    }
    spawn_feed!(
        "Pod",
        watcher(Api::<Pod>::all(client.clone()), cfg()),
        key_of::<Pod>,
        |i, p| i.apply_pod(p),
        |i, ns, name| i.delete_pod(ns.unwrap_or_default(), name)
    );
    spawn_feed!(
        "Namespace",
        watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            cfg()
        ),
        key_of,
        |i, n| i.apply_namespace(&n.name_any(), n.labels()),
        |i, _, name| i.delete_namespace(name)
    );
    // Whole Nodes, for their taints (placement), trimmed at once: a status heartbeat that
    // changes neither labels nor taints triggers nothing.
    spawn_feed!(
        "Node",
        watcher(Api::<Node>::all(client.clone()), cfg()),
        key_of,
        |i, n| i.apply_node(&n.name_any(), &NodeInfo::from_node(n)),
        |i, _, name| i.delete_node(name)
    );
    spawn_feed!(
        "NodeClock",
        watcher(
            Api::<DeserializeGuard<NodeClock>>::all(client.clone()),
            cfg()
        ),
        guard_key::<NodeClock>,
        |i, c| match &c.0 {
            Ok(clock) => i.apply_clock(clock),
            Err(invalid) => {
                tracing::warn!(node = ?invalid.metadata.name, error = %invalid.error, "undecodable NodeClock ignored");
                i.delete_clock(invalid.metadata.name.as_deref().unwrap_or_default())
            }
        },
        |i, _, name| i.delete_clock(name)
    );
    // TimeServices and tenants are watched once: the stream that feeds the index also fills
    // the stores the controllers read objects from, and the controllers are triggered only by
    // the index (`reconcile_on`), so a reconcile never runs ahead of the index it reads.
    let (tenant_store, tenant_writer) = reflector::store();
    let (ts_store, ts_writer) = reflector::store();
    spawn_feed!(
        "TenantTimePolicy",
        watcher(
            Api::<DeserializeGuard<TenantTimePolicy>>::all(client.clone()),
            cfg()
        )
        .reflect(tenant_writer),
        guard_key::<TenantTimePolicy>,
        |i, t| match &t.0 {
            Ok(tenant) => i.apply_tenant(tenant),
            Err(invalid) => {
                tracing::warn!(namespace = ?invalid.metadata.namespace, tenant = ?invalid.metadata.name, error = %invalid.error, "undecodable TenantTimePolicy ignored");
                i.delete_tenant(
                    invalid.metadata.namespace.as_deref().unwrap_or_default(),
                    invalid.metadata.name.as_deref().unwrap_or_default(),
                )
            }
        },
        |i, ns, name| i.delete_tenant(ns.unwrap_or_default(), name)
    );
    spawn_feed!(
        "TimeService",
        watcher(
            Api::<DeserializeGuard<TimeService>>::all(client.clone()),
            cfg()
        )
        .reflect(ts_writer),
        guard_key::<TimeService>,
        |i, t| match &t.0 {
            Ok(ts) => i.apply_time_service(ts),
            Err(invalid) => {
                tracing::warn!(time_service = ?invalid.metadata.name, error = %invalid.error, "undecodable TimeService ignored");
                i.delete_time_service(invalid.metadata.name.as_deref().unwrap_or_default())
            }
        },
        |i, _, name| i.delete_time_service(name)
    );
    // Tenant children, as metadata: every Service (a user's of a tenant's chosen name is a
    // Conflict, never adopted), Stratum's EndpointSlices (to prune) and every `time-config`.
    spawn_feed!(
        "Service",
        watcher(
            Api::<PartialObjectMeta<Service>>::all(client.clone()),
            cfg()
        ),
        key_of,
        |i, o| i.apply_child(ChildKind::Service, &o.metadata),
        |i, ns, name| i.delete_child(ChildKind::Service, ns.unwrap_or_default(), name)
    );
    spawn_feed!(
        "EndpointSlice",
        watcher(
            Api::<PartialObjectMeta<EndpointSlice>>::all(client.clone()),
            cfg().labels(&format!(
                "app.kubernetes.io/managed-by={}",
                names::MANAGED_BY
            ))
        ),
        key_of,
        |i, o| i.apply_child(ChildKind::EndpointSlice, &o.metadata),
        |i, ns, name| i.delete_child(ChildKind::EndpointSlice, ns.unwrap_or_default(), name)
    );
    spawn_feed!(
        "ConfigMap",
        watcher(
            Api::<PartialObjectMeta<ConfigMap>>::all(client.clone()),
            cfg().fields(&format!("metadata.name={}", names::TIME_CONFIG_NAME))
        ),
        key_of,
        |i, o| i.apply_child(ChildKind::ConfigMap, &o.metadata),
        |i, ns, name| i.delete_child(ChildKind::ConfigMap, ns.unwrap_or_default(), name)
    );
    // Never plan from a partial picture: an allow list computed before the pods are listed
    // would briefly lock clients out, and a Service not yet listed could be taken over.
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let all_synced = futures::future::join_all(synced);
    tokio::select! {
        _ = all_synced => {}
        () = shutdown.clone() => {
            tracing::info!("stopped before the indexes synced");
            return;
        }
    }
    tracing::info!("indexes synced; starting controllers");
    let sweeper = tokio::spawn(sweep(ctx.clone(), senders.clone()));

    let managed = || cfg().labels("app.kubernetes.io/managed-by=stratum-operator");
    let config = controller::Config::default().concurrency(4);
    let ts_controller = Controller::for_stream(index_only(), ts_store)
        .owns(
            Api::<DaemonSet>::namespaced(client.clone(), &ctx.settings.namespace),
            managed(),
        )
        .reconcile_on(ts_rx)
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown.clone())
        .run(
            time_service::reconcile,
            time_service::error_policy,
            ctx.clone(),
        )
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "timeservice controller event");
            }
            futures::future::ready(())
        });
    let tenant_controller = Controller::for_stream(index_only(), tenant_store)
        .reconcile_on(tenant_rx)
        .with_config(config)
        .graceful_shutdown_on(shutdown)
        .run(tenant::reconcile, tenant::error_policy, ctx.clone())
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "tenant controller event");
            }
            futures::future::ready(())
        });
    futures::join!(ts_controller, tenant_controller);
    sweeper.abort();
}

/// Acts on time passing, which no watch event reports: when a NodeClock goes stale its
/// tenants are reconciled (its endpoints stop being ready within the freshness bound even if
/// its agent is stopped and nothing else happens), and NodeClocks whose Node is gone are
/// deleted. Sleeps until the index's next expiry, at most [`max_sweep_interval`].
async fn sweep(ctx: Arc<Context>, senders: TriggerSenders) {
    let longest = max_sweep_interval();
    loop {
        let (sweep, now) = {
            let mut index = lock(&ctx.index);
            (index.sweep(), index.clock().now())
        };
        if !sweep.triggers.is_empty() {
            tracing::info!(
                tenants = sweep.triggers.tenants.len(),
                "NodeClocks went stale; reconciling their tenants"
            );
            senders.send(sweep.triggers);
        }
        for (node, uid) in &sweep.collect {
            collect_node_clock(&ctx.client, node, uid.clone()).await;
        }
        let wait = sweep
            .next
            .map_or(longest, |at| at.saturating_duration_since(now))
            .min(longest);
        tokio::time::sleep(wait).await;
    }
}

/// Deletes the NodeClock of a Node that is gone (only that object: its uid is the
/// precondition, so an agent that re-registered meanwhile keeps its new one).
async fn collect_node_clock(client: &Client, node: &str, uid: Option<String>) {
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match Api::<NodeClock>::all(client.clone())
        .delete(node, &params)
        .await
    {
        Ok(_) => tracing::info!(node, "deleted the NodeClock of a Node that is gone"),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => tracing::warn!(node, error = %e, "deleting the NodeClock of a gone Node failed"),
    }
}
