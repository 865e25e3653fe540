//! Redis's highly available forms and TLS to Redis (README "Running several public proxies",
//! docs/scaling.md), on the fixture of `store.rs`: Sentinel failover without losing an
//! acknowledged announcement, a Redis Cluster shared by both instances, Sentinel and Cluster
//! down for a while, and TLS to Redis with a client certificate and a wrong CA.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eps_core::tls::TlsSettings;
use eps_tests::redis::{Redis, RedisCluster, Resp, Sentinel};
use eps_tests::tunnel::{Role, Tunnel, DOMAIN, PROCESS_WAIT, PUBLIC, SUCCESS};
use eps_tests::*;

use super::{
    domains, ride_out_outage, works_at, Instances, FOLLOWING, RECOVERY, REDIS_KEY, REDIS_PASSWORD,
    WAITING,
};

/// The name the Sentinels monitor the primary under.
const SENTINEL_NAME: &str = "eps-primary";

/// One announcement sent: when it was answered, the domain, whether it was acknowledged.
type Sent = (Instant, String, bool);

/// A primary, `replicas` replicas of it and three Sentinels watching it (quorum 2), all in
/// `t`'s folder, the replicas synced.
async fn sentinel_setup(t: &Tunnel, replicas: usize) -> (Redis, Vec<Redis>, Vec<Sentinel>) {
    let primary = Redis::start(
        &t.dir.join("redis-primary"),
        t.dir.join("redis-primary.log"),
        Some(REDIS_PASSWORD),
    )
    .await;
    let mut started = Vec::new();
    for i in 0..replicas {
        started.push(
            Redis::start_replica(
                &t.dir.join(format!("redis-replica-{i}")),
                t.dir.join(format!("redis-replica-{i}.log")),
                Some(REDIS_PASSWORD),
                primary.addr,
            )
            .await,
        );
    }
    let mut sentinels = Vec::new();
    for i in 0..3 {
        sentinels.push(
            Sentinel::start(
                &t.dir.join(format!("sentinel-{i}")),
                t.dir.join(format!("sentinel-{i}.log")),
                SENTINEL_NAME,
                primary.addr,
                Some(REDIS_PASSWORD),
            )
            .await,
        );
    }
    (primary, started, sentinels)
}

/// `datastore.settings` through `sentinels`, a change acknowledged once a replica has it.
fn sentinel_settings(sentinels: &[Sentinel]) -> Value {
    json!({
        "addresses": sentinels.iter().map(Sentinel::address).collect::<Vec<_>>(),
        "sentinel": {"master_name": SENTINEL_NAME},
        "password": REDIS_PASSWORD,
        "key": REDIS_KEY,
        "min_replicas": 1,
        "replica_timeout": 1.0,
    })
}

/// Redis with Sentinel: a primary, two replicas, three Sentinels; both public proxies find the
/// primary through the Sentinels and acknowledge an announcement only once a replica has it
/// (`min_replicas: 1`). Announcements flow at a steady rate while the primary is killed with -9;
/// after the failover every acknowledged one is listed by both proxies, and the figures
/// (acknowledged, lost, refused time) are printed.
#[tokio::test(flavor = "multi_thread")]
async fn sentinel_failover_loses_no_acknowledged_announcement() {
    let t = Tunnel::new("store-sentinel");
    let (primary, replicas, sentinels) = sentinel_setup(&t, 2).await;
    // The replicas have synced before announcements are acknowledged with min_replicas 1.
    let settings = sentinel_settings(&sentinels);
    let mut c = Instances::start_with(t, vec![primary], settings).await;
    let private = c.t.private_rpc();

    // Announce n0, n1, ... one after another; record which were acknowledged and when.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let flow = {
        let (stop, log, private) = (stop.clone(), log.clone(), private.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let domain = format!("n{n}.internal-server.local");
                let ok = call(&private, "announceConnection", json!({"domain": domain}))
                    .await
                    .is_ok();
                log.lock().unwrap().push((Instant::now(), domain, ok));
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let acked = |log: &Arc<Mutex<Vec<Sent>>>| log.lock().unwrap().iter().filter(|e| e.2).count();
    assert!(
        wait_until(RECOVERY, || async { acked(&log) >= 20 }).await,
        "announcements are not acknowledged through Sentinel"
    );
    let killed_at = Instant::now();
    c.redis[0].kill();
    // Failover: acknowledgements resume at the new primary.
    let before = acked(&log);
    assert!(
        wait_until(RECOVERY, || async { acked(&log) >= before + 20 }).await,
        "announcements were not acknowledged again after the primary died"
    );
    stop.store(true, Ordering::Relaxed);
    flow.await.unwrap();

    let log = log.lock().unwrap().clone();
    let acknowledged: Vec<&String> = log.iter().filter(|e| e.2).map(|e| &e.1).collect();
    // Refused time: from the kill to the first acknowledgement after it.
    let resumed = log
        .iter()
        .find(|e| e.2 && e.0 > killed_at)
        .map(|e| e.0 - killed_at);
    let mut lost = Vec::new();
    for (name, client) in [("A", c.a_rpc()), ("B", c.b_rpc())] {
        let listed_ok = wait_until(RECOVERY, || async {
            let Ok(list) = call(&client, "getAnnouncements", json!({})).await else {
                return false;
            };
            let have = domains(&list);
            acknowledged.iter().all(|d| have.contains(d))
        })
        .await;
        if !listed_ok {
            let list = call(&client, "getAnnouncements", json!({})).await.unwrap();
            let have = domains(&list);
            lost.extend(
                acknowledged
                    .iter()
                    .filter(|d| !have.contains(d))
                    .map(|d| format!("{d} at {name}")),
            );
        }
    }
    println!(
        "sentinel failover: {} announcements sent, {} acknowledged, {} lost, refused for {:?} after the kill",
        log.len(),
        acknowledged.len(),
        lost.len(),
        resumed
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    // Routing works at both instances for a name acknowledged after the failover.
    let t = &c.t;
    let last = acknowledged.last().unwrap().as_str();
    assert!(works_at(t, t.public_addr, last).await, "{last} at A");
    assert!(c.b_works_for(last).await, "{last} at B");
    drop(replicas);
    drop(sentinels);
}

/// Sentinel with its primary and replica killed (SIGKILL) at once, so that no failover can
/// happen: routing from memory, 503 for announcements, all back once both are started again.
#[tokio::test(flavor = "multi_thread")]
async fn sentinel_down_routes_from_memory_and_recovers() {
    let t = Tunnel::new("store-sentinel-down");
    let (primary, replicas, sentinels) = sentinel_setup(&t, 1).await;
    let settings = sentinel_settings(&sentinels);
    let redis = std::iter::once(primary).chain(replicas).collect();
    let c = Instances::start_with(t, redis, settings).await;
    ride_out_outage(c, "Sentinel").await;
    drop(sentinels);
}

/// `datastore.settings` of a cluster: every node as a seed, `min_replicas` as given.
fn cluster_settings(cluster: &RedisCluster, min_replicas: u32) -> Value {
    json!({
        "addresses": cluster.addresses(),
        "cluster": true,
        "password": REDIS_PASSWORD,
        "key": REDIS_KEY,
        "min_replicas": min_replicas,
        "replica_timeout": 1.0,
    })
}

/// A Redis Cluster of three primaries, each with a replica, behind both instances
/// (`min_replicas: 1`): an announcement made at A (the EPS server delivers there) and one made
/// at B (after the EPS server is pointed at B) are routed by both, and the hash lives on one
/// primary, the one serving its slot. Then that primary is killed with -9: its replica takes
/// over, nothing acknowledged is lost, and a new announcement routes at both.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_routes_announcements_made_at_either_instance() {
    let t = Tunnel::new("store-cluster");
    let cluster = RedisCluster::start(&t.dir.join("redis-cluster"), 3, 1, REDIS_PASSWORD).await;
    let settings = cluster_settings(&cluster, 1);
    let mut c = Instances::start_with(t, cluster.nodes, settings).await;

    for (name, addr) in [("A", c.t.public_addr), ("B", c.b_public)] {
        assert!(works_at(&c.t, addr, DOMAIN).await, "{DOMAIN} at {name}");
        let (status, body) = curl(&c.t.root(), addr, DOMAIN, None).await;
        assert_eq!((status, body.as_str()), (200, SUCCESS), "curl at {name}");
    }
    let private = c.t.private_rpc();
    let at_a = "at-a.internal-server.local";
    call(&private, "announceConnection", json!({"domain": at_a}))
        .await
        .expect("announcing at A");
    c.routed_at_both(at_a, "A").await;

    // The public EPS server now delivers to B: the next announcement is made at B.
    let eps_dir = c.t.settings_dir(Role::PublicEps).to_path_buf();
    c.t.dir.write_yaml(
        eps_dir.join("zz-deliver-to-b.yml"),
        &json!({"jsonrpc_client": {"url": format!("https://{}/jsonrpc", c.b_rpc)}}),
    );
    c.t.restart(Role::PublicEps);
    c.t.wait_ready(Role::PublicEps).await;
    let at_b = "at-b.internal-server.local";
    let accepted = wait_until(RECOVERY, || async {
        call(&private, "announceConnection", json!({"domain": at_b}))
            .await
            .is_ok()
    })
    .await;
    assert!(accepted, "{at_b} not accepted through B");
    assert!(
        c.b.run_log().contains(at_b),
        "B did not take the announcement of {at_b}:\n{}",
        c.b.run_log()
    );
    assert!(
        !c.t.proc(Role::PublicProxy).run_log().contains(at_b),
        "A took the announcement of {at_b}; it was meant for B"
    );
    c.routed_at_both(at_b, "B").await;

    // One primary holds the hash; the other nodes redirect (MOVED; a replica too, since
    // clients read from primaries unless they ask otherwise).
    let mut holders = Vec::new();
    for (i, node) in c.redis.iter().enumerate() {
        match node.command(&["HLEN", REDIS_KEY]).await.expect("HLEN") {
            Resp::Integer(n) => holders.push((i, n)),
            Resp::Error(e) => assert!(e.starts_with("MOVED"), "{}: {e}", node.address()),
            other => panic!("HLEN at {}: {other:?}", node.address()),
        }
    }
    assert_eq!(holders.len(), 1, "nodes answering HLEN: {holders:?}");
    assert_eq!(holders[0].1, 3, "{DOMAIN}, {at_a} and {at_b} in the hash");
    listed_at_both(&c, &[DOMAIN, at_a, at_b]).await;

    // The hash's primary dies; the cluster promotes its replica (cluster-node-timeout 2 s).
    let holder = holders[0].0;
    let replication = ["INFO", "replication"];
    let follows_holder = format!("master_port:{}", c.redis[holder].addr.port());
    let mut replica = None;
    for (i, node) in c.redis.iter().enumerate() {
        if i != holder && node.says(&replication, &follows_holder).await {
            replica = Some(i);
        }
    }
    let replica = replica.expect("the hash's primary has a replica");
    let killed_at = Instant::now();
    c.redis[holder].kill();
    let promoted = wait_until(RECOVERY, || {
        c.redis[replica].says(&replication, "role:master")
    })
    .await;
    assert!(
        promoted,
        "the replica of the hash's primary was not promoted"
    );
    let promoted_after = killed_at.elapsed();
    // The new primary has no replica left: announcements are refused rather than acknowledged
    // unreplicated, and the refusal says so.
    let after = "after-failover.internal-server.local";
    let last = Mutex::new(String::new());
    let refused_for_replicas = wait_until(RECOVERY, || async {
        match call(&private, "announceConnection", json!({"domain": after})).await {
            Err(e) => {
                *last.lock().unwrap() = e.to_string();
                e.to_string().contains("min_replicas")
            }
            Ok(_) => {
                *last.lock().unwrap() = "accepted".into();
                false
            }
        }
    })
    .await;
    assert!(
        refused_for_replicas,
        "not refused for want of a replica: {}",
        last.lock().unwrap()
    );
    // The old primary comes back as the new one's replica: announcements are acknowledged again.
    c.redis[holder].restart().await;
    let accepted = wait_until(RECOVERY, || async {
        call(&private, "announceConnection", json!({"domain": after}))
            .await
            .is_ok()
    })
    .await;
    assert!(
        accepted,
        "{after} not accepted once the primary had a replica again"
    );
    let accepted_after = killed_at.elapsed();
    assert!(
        c.redis[holder].says(&replication, "role:slave").await,
        "the old primary did not come back as a replica"
    );
    c.routed_at_both(after, "B").await;
    listed_at_both(&c, &[DOMAIN, at_a, at_b, after]).await;
    println!(
        "cluster failover (min_replicas 1): the hash's primary killed with -9; its replica \
         promoted after {:.1} s; announcements refused for want of a replica until the old \
         primary rejoined as its replica, accepted again {:.1} s after the kill; the 3 \
         acknowledged before it all kept",
        promoted_after.as_secs_f64(),
        accepted_after.as_secs_f64()
    );
}

/// Panics unless both instances list every one of `domains`.
async fn listed_at_both(c: &Instances, domains: &[&str]) {
    for (name, client) in [("A", c.a_rpc()), ("B", c.b_rpc())] {
        let listed = Instances::listed(&client).await.expect("getAnnouncements");
        for d in domains {
            assert!(listed.iter().any(|l| l == d), "{d} not listed at {name}");
        }
    }
}

/// Every node of the cluster killed (SIGKILL) and started again: routing from memory, 503 for
/// announcements, all back without restarting an instance.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_down_routes_from_memory_and_recovers() {
    let t = Tunnel::new("store-cluster-down");
    let cluster = RedisCluster::start(&t.dir.join("redis-cluster"), 3, 0, REDIS_PASSWORD).await;
    let settings = cluster_settings(&cluster, 0);
    let c = Instances::start_with(t, cluster.nodes, settings).await;
    ride_out_outage(c, "Cluster").await;
}

/// A Redis server's TLS from the test's PKI, asking its clients for certificates.
fn redis_server_tls(t: &Tunnel) -> TlsSettings {
    TlsSettings {
        verify_client: true,
        ..t.pki.issue_server("redis", &[])
    }
}

/// TLS to Redis: a server on a TLS port only, asking for client certificates; both instances
/// follow it with the CA file and the client certificate their settings name, and announcements
/// route. An instance trusting another CA says why it cannot reach Redis; one naming a CA file
/// that does not exist refuses to start and names the file.
#[tokio::test(flavor = "multi_thread")]
async fn redis_over_tls_with_the_operators_ca() {
    let t = Tunnel::new("store-tls");
    let server = redis_server_tls(&t);
    let redis = Redis::start_tls(&t.dir.join("redis"), t.dir.join("redis.log"), &server).await;
    let settings = |ca: &std::path::Path| {
        json!({
            "addresses": [redis.address()],
            "key": REDIS_KEY,
            "tls": {"ca_certificate": ca, "certificate": t.pki.cert(PUBLIC), "key": t.pki.key(PUBLIC)},
        })
    };
    let ours = settings(&t.pki.root());
    let foreign = Pki::new(t.dir.join("foreign-pki"), &["stranger"], None);
    let wrong_ca = settings(&foreign.root());
    let missing = t.dir.join("no-such-ca.crt");
    let no_ca = settings(&missing);
    let c = Instances::start_with(t, vec![redis], ours).await;
    assert!(
        c.t.proc(Role::PublicProxy).run_log().contains("over TLS"),
        "A does not say it follows Redis over TLS"
    );

    let private = c.t.private_rpc();
    let fresh = "tls.internal-server.local";
    call(&private, "announceConnection", json!({"domain": fresh}))
        .await
        .expect("announcing through A over TLS");
    c.routed_at_both(fresh, "A").await;

    // A third instance trusting another CA: it starts (routing from memory), never follows
    // Redis, and says that Redis's certificate is not trusted.
    let mut wrong = c.extra_instance("public-proxy-wrong-ca", &wrong_ca);
    wrong.wait_for_log(WAITING, PROCESS_WAIT).await;
    let log = wrong.run_log();
    assert!(
        !log.contains(FOLLOWING),
        "followed Redis with a foreign CA:\n{log}"
    );
    let said = log
        .lines()
        .find(|l| l.contains(WAITING))
        .unwrap_or_default();
    assert!(
        said.contains("UnknownIssuer") || said.contains("certificate"),
        "the refusal does not name the certificate: {said}"
    );
    // And one naming a CA file that is not there stops before it serves, naming the file.
    let mut absent = c.extra_instance("public-proxy-no-ca", &no_ca);
    let status = absent.wait_exit(PROCESS_WAIT).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "started with a missing CA file: {status:?}"
    );
    let log = absent.run_log();
    assert!(
        log.contains(&missing.display().to_string()),
        "the error does not name {}:\n{log}",
        missing.display()
    );
}

/// The Sentinel form over TLS: a primary and a Sentinel listening on TLS only, both requiring
/// client certificates; both instances ask the Sentinel for the primary and reach it with the
/// same `tls` section, and an announcement made at A is routed by both.
#[tokio::test(flavor = "multi_thread")]
async fn sentinel_over_tls() {
    let t = Tunnel::new("store-sentinel-tls");
    let server = redis_server_tls(&t);
    let primary = Redis::start_tls(&t.dir.join("redis"), t.dir.join("redis.log"), &server).await;
    let sentinel = Sentinel::start_tls(
        &t.dir.join("sentinel"),
        t.dir.join("sentinel.log"),
        SENTINEL_NAME,
        primary.addr,
        &server,
    )
    .await;
    let settings = json!({
        "addresses": [sentinel.address()],
        "sentinel": {"master_name": SENTINEL_NAME},
        "key": REDIS_KEY,
        "tls": {"ca_certificate": t.pki.root(), "certificate": t.pki.cert(PUBLIC),
                "key": t.pki.key(PUBLIC)},
    });
    let c = Instances::start_with(t, vec![primary], settings).await;
    let log = c.t.proc(Role::PublicProxy).run_log();
    assert!(
        log.contains("via Sentinel") && log.contains("over TLS"),
        "A does not say it follows the Sentinels' primary over TLS:\n{log}"
    );
    let fresh = "sentinel-tls.internal-server.local";
    call(
        &c.t.private_rpc(),
        "announceConnection",
        json!({"domain": fresh}),
    )
    .await
    .expect("announcing through A, Sentinel and primary over TLS");
    c.routed_at_both(fresh, "A").await;
    drop(sentinel);
}

/// Rotating Redis's TLS: the server restarts with a certificate from a new CA, and the file
/// the instances name as `ca_certificate` is replaced with that CA. Both instances reconnect
/// with the new file, without a restart, and announcements are acknowledged and routed again.
#[tokio::test(flavor = "multi_thread")]
async fn redis_tls_files_rotate_without_a_restart() {
    let t = Tunnel::new("store-tls-rotate");
    let server = redis_server_tls(&t);
    let ca = t.dir.join("redis-ca.crt");
    std::fs::copy(t.pki.root(), &ca).unwrap();
    let redis = Redis::start_tls(&t.dir.join("redis"), t.dir.join("redis.log"), &server).await;
    let settings = json!({
        "addresses": [redis.address()],
        "key": REDIS_KEY,
        "tls": {"ca_certificate": ca, "certificate": t.pki.cert(PUBLIC), "key": t.pki.key(PUBLIC)},
    });
    let new_ca = Pki::new(t.dir.join("new-pki"), &[], None);
    let mut c = Instances::start_with(t, vec![redis], settings).await;
    let private = c.t.private_rpc();
    call(
        &private,
        "announceConnection",
        json!({"domain": "before.internal-server.local"}),
    )
    .await
    .expect("announcing before the rotation");

    // The new certificate goes where the server reads it; the CA file is replaced by rename.
    let issued = new_ca.issue_server("redis", &[]);
    std::fs::copy(&issued.certificate, &server.certificate).unwrap();
    std::fs::copy(&issued.key, &server.key).unwrap();
    let staged = c.t.dir.join("redis-ca.crt.new");
    std::fs::copy(new_ca.root(), &staged).unwrap();
    std::fs::rename(&staged, &ca).unwrap();
    c.redis[0].restart().await;

    let after = "after.internal-server.local";
    let announced = wait_until(RECOVERY, || async {
        call(&private, "announceConnection", json!({"domain": after}))
            .await
            .is_ok()
    })
    .await;
    let log = c.t.proc(Role::PublicProxy).run_log();
    assert!(
        announced,
        "no announcement accepted after the rotation:\n{log}"
    );
    assert!(log.contains("Redis TLS files reloaded"), "{log}");
    c.routed_at_both(after, "A").await;
}
