//! Announcement stores (docs/architecture.md §3.4, §8.2, README "Running several public proxies"): two public proxy
//! instances of one operator sharing their announcements in Redis, routing from memory while
//! Redis is down, and stores that lose no acknowledged announcement on `kill -9` (the file store
//! of one instance; Redis with `appendfsync always`).
//!
//! The fixture is the demo's five processes (`support/tunnel.rs`) with the public proxy's
//! datastore switched to a Redis of the test's own (`support/redis.rs`), plus a second public
//! proxy instance `B` with its own ports and `internal_endpoint`. The one EPS server of
//! `public-proxy-1` delivers calls to instance A only; both instances call it for dial-backs.
//!
//! Redis's highly available forms (Sentinel, Cluster) and TLS to Redis are in `store/ha.rs`,
//! on the same fixture.
//!
//! Needs `redis-server` and `redis-cli` (apt-get install redis-server redis-tools). Build the
//! binaries first:
//! `cargo build --workspace && cargo test -p eps-tests --test store`. Measurements are printed
//! (`-- --nocapture` shows them).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eps_core::http::{CallError, RpcClient};
use eps_core::jsonrpc;
use eps_tests::keepalive::KeepAlive;
use eps_tests::redis::Redis;
use eps_tests::tunnel::{
    https_request, Role, Tunnel, ATTEMPT_TIMEOUT, DOMAIN, PRIVATE, PROCESS_WAIT, PUBLIC,
    RPC_TIMEOUT, SUCCESS,
};
use eps_tests::*;

#[path = "store/ha.rs"]
mod ha;

/// The Redis password (given literally in the test's settings file).
const REDIS_PASSWORD: &str = "test-redis-password";
/// The Redis hash of the announcements (not the default, to show the key is taken).
const REDIS_KEY: &str = "eps-test:announcements";
/// What an instance logs once it has loaded the hash and follows the channel.
const FOLLOWING: &str = "following Redis";
/// What an instance logs when it loses Redis.
const WAITING: &str = "waiting for Redis; routing from memory";
/// Time an announcement gets to be listed by the other instance.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(1);
/// Time everything gets to work again after Redis or a proxy came back.
const RECOVERY: Duration = Duration::from_secs(20);

/// The demo with two public proxy instances sharing one Redis. Fields drop in order: the second
/// instance and Redis first, the tunnel (its processes, then its folder) last.
struct Instances {
    b: Proc,
    /// Instance B's public port.
    b_public: SocketAddr,
    /// Instance B's JSON-RPC server.
    b_rpc: SocketAddr,
    /// The Redis processes: the one server, the primary (then its replicas) of a Sentinel
    /// setup, or the nodes of a cluster.
    redis: Vec<Redis>,
    t: Tunnel,
}

impl Instances {
    /// Starts Redis, the five processes with instance A on Redis, and instance B; returns once a
    /// request goes through A and B follows Redis.
    async fn start(test: &str) -> Self {
        let t = Tunnel::new(test);
        let redis = Redis::start(
            &t.dir.join("redis"),
            t.dir.join("redis.log"),
            Some(REDIS_PASSWORD),
        )
        .await;
        let settings = json!({
            "addresses": [redis.address()],
            "database": 0,
            "password": REDIS_PASSWORD,
            "key": REDIS_KEY,
        });
        Self::start_with(t, vec![redis], settings).await
    }

    /// [`start`](Self::start) with the Redis processes `redis` and these `datastore.settings`.
    async fn start_with(mut t: Tunnel, redis: Vec<Redis>, settings: Value) -> Self {
        // Later files win, and a `type` change replaces the whole datastore section.
        let a_dir = t.settings_dir(Role::PublicProxy).to_path_buf();
        t.dir.write_yaml(
            a_dir.join("zz-redis.yml"),
            &json!({"datastore": {"type": "redis", "settings": settings}}),
        );
        // Instance B: A's settings plus its own ports.
        let (b_public, b_internal, b_rpc) = (free_addr(), free_addr(), free_addr());
        let b_dir = t.dir.mkdir("public-proxy-b");
        t.dir.write_yaml(
            b_dir.join("instance-b.yml"),
            &json!({
                "jsonrpc_server": {"bind_address": b_rpc},
                "public": {
                    "bind_address": b_public,
                    "internal_bind_address": b_internal,
                    "internal_endpoint": b_internal.to_string(),
                },
            }),
        );
        t.start_all().await;
        t.proc_mut(Role::PublicProxy)
            .wait_for_log(FOLLOWING, PROCESS_WAIT)
            .await;
        let dirs = std::env::join_paths([&a_dir, &b_dir]).expect("no ':' in the folders");
        let mut b = Proc::start(
            "public-proxy-b",
            &bin_path("proxy"),
            ["run", "public"],
            [("PROXY_SETTINGS", dirs)],
            t.dir.join("public-proxy-b.log"),
        );
        b.wait_for_log(FOLLOWING, PROCESS_WAIT).await;
        Self {
            b,
            b_public,
            b_rpc,
            redis,
            t,
        }
    }

    /// Another instance, `name`: A's settings with its own ports and these
    /// `datastore.settings` over A's; started, not waited for.
    fn extra_instance(&self, name: &str, datastore: &Value) -> Proc {
        let dir = self.t.dir.mkdir(name);
        let (public, internal, rpc) = (free_addr(), free_addr(), free_addr());
        self.t.dir.write_yaml(
            dir.join("instance.yml"),
            &json!({
                "jsonrpc_server": {"bind_address": rpc},
                "public": {
                    "bind_address": public,
                    "internal_bind_address": internal,
                    "internal_endpoint": internal.to_string(),
                },
                "datastore": {"type": "redis", "settings": datastore},
            }),
        );
        let dirs = std::env::join_paths([self.t.settings_dir(Role::PublicProxy), &dir])
            .expect("no ':' in the folders");
        Proc::start(
            name,
            &bin_path("proxy"),
            ["run", "public"],
            [("PROXY_SETTINGS", dirs)],
            self.t.dir.join(format!("{name}.log")),
        )
    }

    /// A JSON-RPC client of instance A, with the operator's certificate.
    fn a_rpc(&self) -> RpcClient {
        self.t.public_rpc()
    }

    /// A JSON-RPC client of instance B, with the operator's certificate.
    fn b_rpc(&self) -> RpcClient {
        rpc_client(
            &format!("https://{}/jsonrpc", self.b_rpc),
            Some(&self.t.pki.tls(PUBLIC)),
            RPC_TIMEOUT,
        )
    }

    /// True when a request for `sni` through instance B gets the demo's answer.
    async fn b_works_for(&self, sni: &str) -> bool {
        works_at(&self.t, self.b_public, sni).await
    }

    /// `domain`, announced through instance `at` (`"A"` or `"B"`), is routed by the other one
    /// once it has followed Redis (within [`RECOVERY`]), and by `at` itself at once.
    async fn routed_at_both(&self, domain: &str, at: &str) {
        let (a, b) = (self.t.public_addr, self.b_public);
        let (near, far, other) = if at == "A" { (a, b, "B") } else { (b, a, "A") };
        assert!(
            wait_until(RECOVERY, || works_at(&self.t, far, domain)).await,
            "{domain}, announced at {at}, is not routed at {other}"
        );
        assert!(
            works_at(&self.t, near, domain).await,
            "{domain} is not routed at {at}"
        );
    }

    /// How many announcements Redis holds (`HLEN` of the store's hash).
    async fn stored(&self) -> Option<i64> {
        self.redis[0]
            .command(&["HLEN", REDIS_KEY])
            .await
            .expect("HLEN")
            .as_integer()
    }

    /// The domains `client` (an instance) lists.
    async fn listed(client: &RpcClient) -> Result<Vec<String>, CallError> {
        Ok(domains(&call(client, "getAnnouncements", json!({})).await?))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_serve_one_announcement() {
    let c = Instances::start("store-two").await;
    let t = &c.t;

    // The private proxy announced once (to A, through the EPS network); both list it.
    for (name, client) in [("A", c.a_rpc()), ("B", c.b_rpc())] {
        let list = call(&client, "getAnnouncements", json!({}))
            .await
            .unwrap_or_else(|e| panic!("getAnnouncements at {name}: {e}"));
        let entries = list.as_array().expect("a list");
        assert!(
            entries
                .iter()
                .any(|a| a["domain"] == DOMAIN && a["operator"] == PRIVATE),
            "instance {name}: {list}"
        );
    }
    let stored = c.stored().await;
    assert_eq!(stored, Some(1), "announcements in Redis");

    // Clients at either instance reach the internal server: each instance names its own
    // internal port in incomingConnection, so the private proxy dials the one holding the
    // client (a dial-back to the other one would carry an unknown token and fail).
    for (name, addr) in [("A", t.public_addr), ("B", c.b_public)] {
        for i in 0..10 {
            let r = https_request(
                addr,
                t.client_config(),
                DOMAIN,
                "POST",
                "/jsonrpc",
                b"{}",
                ATTEMPT_TIMEOUT,
            )
            .await
            .unwrap_or_else(|e| panic!("request #{i} through instance {name}: {e}"));
            assert_eq!(
                (r.status, r.text().as_str()),
                (200, SUCCESS),
                "#{i} at {name}"
            );
        }
        let (status, body) = curl(&t.root(), addr, DOMAIN, None).await;
        assert_eq!((status, body.as_str()), (200, SUCCESS), "curl at {name}");
    }
    // B relayed its own clients (11), A did not see them.
    let relayed = wait_until(Duration::from_secs(5), || async {
        c.b.run_log().matches("connection relayed").count() >= 11
    })
    .await;
    assert!(
        relayed,
        "instance B did not log its relays:\n{}",
        c.b.run_log()
    );
    assert!(
        !c.b.run_log().contains("dial-back request failed"),
        "{}",
        c.b.run_log()
    );
}

/// With Redis, a wildcard announced at A routes at B, and the claim script keeps another
/// operator's exact name out of it (409, decided in Redis, not in either instance's memory).
#[tokio::test(flavor = "multi_thread")]
async fn wildcards_are_shared_and_guarded_in_redis() {
    let c = Instances::start("store-wildcard").await;
    let t = &c.t;
    let wildcard = "*.internal-server.local";
    call(
        &t.private_rpc(),
        "announceConnection",
        json!({"domain": wildcard}),
    )
    .await
    .expect("announcing the wildcard");
    let routed = wait_until(PROPAGATION_LIMIT * 5, || {
        c.b_works_for("w.internal-server.local")
    })
    .await;
    assert!(routed, "instance B does not route a name under {wildcard}");
    let _other_eps = t.start_other_eps().await;
    let r = call(
        &t.other_eps_client(),
        "public-proxy-1.announceConnections",
        json!({"connections": [{"domain": "w.internal-server.local"}]}),
    )
    .await
    .expect("announceConnections from private-proxy-2");
    let c0 = &r["connections"][0];
    assert_eq!(c0["error"]["code"], jsonrpc::CONFLICT, "{r}");
    assert!(
        c0["error"]["message"]
            .as_str()
            .unwrap()
            .contains("covered by"),
        "{r}"
    );
    assert!(c.b_works_for("w.internal-server.local").await);

    // A name private-proxy-2 held before a wildcard came over it stays its own: renewing it
    // is accepted (the claim script checks the holder before the wildcard).
    let other = t.other_eps_client();
    let announce_other = |domain: &'static str| {
        let other = &other;
        async move {
            call(
                other,
                "public-proxy-1.announceConnections",
                json!({"connections": [{"domain": domain}]}),
            )
            .await
            .expect("announceConnections from private-proxy-2")
        }
    };
    let r = announce_other("k.sub.internal-server.local").await;
    assert_eq!(r["connections"][0]["accepted"], true, "{r}");
    call(
        &t.private_rpc(),
        "announceConnection",
        json!({"domain": "*.sub.internal-server.local"}),
    )
    .await
    .expect("a wildcard over another operator's name");
    let r = announce_other("k.sub.internal-server.local").await;
    assert_eq!(r["connections"][0]["accepted"], true, "renewal: {r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn announcements_propagate_within_a_second() {
    const TOTAL: usize = 200;
    let c = Instances::start("store-propagate").await;
    let private = c.t.private_rpc();
    let b = c.b_rpc();

    let mut announce_ms = Vec::with_capacity(TOTAL);
    let mut propagation_ms = Vec::with_capacity(TOTAL);
    let mut polls = 0usize;
    for i in 0..TOTAL {
        let domain = format!("n{i}.internal-server.local");
        let start = Instant::now();
        call(&private, "announceConnection", json!({"domain": domain}))
            .await
            .unwrap_or_else(|e| panic!("announceConnection {domain}: {e}"));
        let answered = Instant::now();
        announce_ms.push(ms(answered - start));
        // Poll B (not A, which made the change) back to back until it lists the domain.
        loop {
            polls += 1;
            let listed = Instances::listed(&b).await.expect("getAnnouncements at B");
            if listed.contains(&domain) {
                break;
            }
            assert!(
                answered.elapsed() < Duration::from_secs(5),
                "instance B does not list {domain} 5 s after it was accepted"
            );
            tokio::task::yield_now().await;
        }
        propagation_ms.push(ms(answered.elapsed()));
    }
    // Routed at B, the first and the last.
    for i in [0, TOTAL - 1] {
        let domain = format!("n{i}.internal-server.local");
        assert!(c.b_works_for(&domain).await, "{domain} is not routed at B");
        assert!(c.t.works_for(&domain).await, "{domain} is not routed at A");
    }
    let stored = c.stored().await;
    assert_eq!(stored, Some(TOTAL as i64 + 1), "announcements in Redis");

    let (p50, p99, max) = percentiles(&mut propagation_ms);
    let (a50, a99, amax) = percentiles(&mut announce_ms);
    println!(
        "{TOTAL} announcements through instance A: listed by instance B after the \
         announceConnection answer: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms \
         ({polls} getAnnouncements polls); announceConnection itself (private proxy → 2 EPS \
         servers → A → Redis): p50 {a50:.1} ms, p99 {a99:.1} ms, max {amax:.1} ms"
    );
    assert!(
        p99 < ms(PROPAGATION_LIMIT),
        "p99 propagation {p99:.1} ms is over {PROPAGATION_LIMIT:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_routes_from_memory_and_recovers() {
    let c = Instances::start("store-redis-down").await;
    ride_out_outage(c, "one server").await;
}

/// Every Redis process of `c` is killed (SIGKILL) and, later, started again on its port with
/// its files: meanwhile kept-alive relays and new clients of known domains go on at both
/// instances and announcements get 503 naming Redis; afterwards a new announcement is accepted
/// and routed at both, without restarting either instance. `form` names the setup in the
/// printed figures.
async fn ride_out_outage(mut c: Instances, form: &str) {
    let private = c.t.private_rpc();

    // A connection relayed before Redis goes, at each instance, kept alive across everything.
    let mut at_a = KeepAlive::open(c.t.public_addr, c.t.client_config(), DOMAIN)
        .await
        .expect("keep-alive connection through A");
    let mut at_b = KeepAlive::open(c.b_public, c.t.client_config(), DOMAIN)
        .await
        .expect("keep-alive connection through B");
    at_a.expect_success("before Redis stops, A").await;
    at_b.expect_success("before Redis stops, B").await;

    for r in &mut c.redis {
        r.kill(); // SIGKILL
    }
    let killed = Instant::now();
    let noticed = wait_until(Duration::from_secs(10), || async {
        c.t.proc(Role::PublicProxy).run_log().contains(WAITING) && c.b.run_log().contains(WAITING)
    })
    .await;
    assert!(noticed, "the instances did not log {WAITING:?}");
    let noticed_after = killed.elapsed();

    // Established relays go on; new clients of known domains are routed from memory.
    at_a.expect_success("Redis down, A").await;
    at_b.expect_success("Redis down, B").await;
    for i in 0..5 {
        assert!(
            c.t.works().await,
            "new client #{i} at A while Redis is down"
        );
        assert!(
            c.b_works_for(DOMAIN).await,
            "new client #{i} at B while Redis is down"
        );
    }
    // Announcements are refused, with 503 and a message naming Redis.
    let down = "down.internal-server.local";
    match call(&private, "announceConnection", json!({"domain": down})).await {
        Err(CallError::Rpc(e)) => {
            assert_eq!(e.code, jsonrpc::SERVICE_UNAVAILABLE, "{e:?}");
            assert!(e.message.contains("Redis"), "{e:?}");
        }
        other => panic!("announcement while Redis is down: expected 503, got {other:?}"),
    }
    assert!(
        !c.t.works_for(down).await,
        "{down} routed while Redis is down"
    );

    // Redis back on the same ports with the same files: announcements work again, nothing is
    // restarted.
    for r in &mut c.redis {
        r.restart().await;
    }
    let back = Instant::now();
    at_a.expect_success("Redis just restarted, A").await;
    at_b.expect_success("Redis just restarted, B").await;
    let fresh = "back.internal-server.local";
    let last_error = Mutex::new(None);
    let accepted = wait_until(RECOVERY, || async {
        match call(&private, "announceConnection", json!({"domain": fresh})).await {
            Ok(_) => true,
            Err(e) => {
                *last_error.lock().unwrap() = Some(e);
                false
            }
        }
    })
    .await;
    assert!(
        accepted,
        "announcements still refused {RECOVERY:?} after Redis came back: {:?}",
        last_error.lock().unwrap()
    );
    let accepted_after = back.elapsed();
    let routed = wait_until(RECOVERY, || c.b_works_for(fresh)).await;
    assert!(routed, "{fresh} not routed at B after Redis came back");
    let routed_after = back.elapsed();
    assert!(c.t.works_for(fresh).await, "{fresh} not routed at A");
    for (name, log) in [
        ("A", c.t.proc(Role::PublicProxy).run_log()),
        ("B", c.b.run_log()),
    ] {
        assert!(
            log.matches(FOLLOWING).count() >= 2,
            "instance {name} did not follow Redis again:\n{log}"
        );
    }
    at_a.expect_success("after Redis is back, A").await;
    at_b.expect_success("after Redis is back, B").await;
    let refusals =
        c.t.proc(Role::PublicProxy)
            .run_log()
            .matches("announcements not stored")
            .count();
    println!(
        "Redis ({form}) killed: both instances noticed within {:.3} s; kept-alive relays and new clients \
         of known domains went on; {refusals} announcement call(s) refused with 503. Redis \
         restarted: a new announcement accepted after {:.3} s and routed at instance B after \
         {:.3} s",
        noticed_after.as_secs_f64(),
        accepted_after.as_secs_f64(),
        routed_after.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn file_store_keeps_acknowledged_announcements_through_kill_9() {
    const TOTAL: usize = 200;
    let mut t = Tunnel::started("store-file-kill").await;

    // Announce TOTAL domains one after the other, each retried until acknowledged, while the
    // public proxy is killed (SIGKILL) and started again at random points.
    let private = t.private_rpc();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let announcer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let failures = AtomicUsize::new(0);
            for i in 0..TOTAL {
                let domain = format!("f{i}.internal-server.local");
                let ok = wait_until(RECOVERY, || async {
                    match call(&private, "announceConnection", json!({"domain": domain})).await {
                        Ok(_) => true,
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            false
                        }
                    }
                })
                .await;
                assert!(ok, "{domain} not acknowledged within {RECOVERY:?}");
                acked.lock().unwrap().push(domain);
            }
            failures.into_inner()
        })
    };
    let mut kills = 0usize;
    while !announcer.is_finished() {
        tokio::time::sleep(Duration::from_millis(u64::from(random_u32() % 400))).await;
        t.restart(Role::PublicProxy); // SIGKILL, then the same command again
        kills += 1;
        t.wait_ready(Role::PublicProxy).await;
    }
    let failures = announcer.await.expect("the announcer");
    // Once more right after the last acknowledgement.
    t.restart(Role::PublicProxy);
    kills += 1;
    t.wait_ready(Role::PublicProxy).await;

    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), TOTAL);
    let public = t.public_rpc();
    let listed = Mutex::new(Vec::new());
    let answered = wait_until(RECOVERY, || async {
        match Instances::listed(&public).await {
            Ok(l) => {
                *listed.lock().unwrap() = l;
                true
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(
        answered,
        "the public proxy does not answer getAnnouncements"
    );
    let listed = listed.into_inner().unwrap();
    let missing: Vec<&String> = acked.iter().filter(|d| !listed.contains(d)).collect();
    assert!(
        missing.is_empty(),
        "{} of {TOTAL} acknowledged announcements lost after {kills} kill -9: {missing:?}",
        missing.len()
    );
    let data = t.dir.join("data/public-proxy-1");
    let file = data.join("announcements.json");
    let text = std::fs::read_to_string(&file).expect("the store file");
    let stored: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}):\n{text}", file.display()));
    let stored = domains(&stored);
    let missing: Vec<&String> = acked.iter().filter(|d| !stored.contains(d)).collect();
    assert!(missing.is_empty(), "not in {}: {missing:?}", file.display());
    assert!(
        t.works_for(&acked[TOTAL - 1]).await,
        "the last domain is not routed"
    );
    let leftovers = std::fs::read_dir(&data)
        .expect("the data folder")
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "announcements.json")
        .count();
    println!(
        "file store: {TOTAL} announcements acknowledged in {:.1} s while the public proxy was \
         killed (SIGKILL) and restarted {kills} times ({failures} attempts refused while it was \
         down); all {TOTAL} listed after the last restart and in the store file; {leftovers} \
         other file(s) left in the store's folder",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_store_keeps_acknowledged_announcements_through_kill_9() {
    const MAX: usize = 400;
    let mut c = Instances::start("store-redis-kill").await;

    // Announce until Redis is killed under the announcer's feet.
    let private = c.t.private_rpc();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let announcer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            for i in 0..MAX {
                let domain = format!("r{i}.internal-server.local");
                match call(&private, "announceConnection", json!({"domain": domain})).await {
                    Ok(_) => acked.lock().unwrap().push(domain),
                    Err(e) => return Some(e),
                }
            }
            None
        })
    };
    let threshold = 30 + (random_u32() % 40) as usize;
    let enough = wait_until(Duration::from_secs(30), || async {
        acked.lock().unwrap().len() >= threshold
    })
    .await;
    assert!(
        enough,
        "fewer than {threshold} announcements acknowledged in 30 s"
    );
    c.redis[0].kill(); // SIGKILL, in the middle of the announcements
    c.t.proc_mut(Role::PublicProxy).kill();
    c.b.kill();
    let stopped_by = announcer.await.expect("the announcer");
    let acked = acked.lock().unwrap().clone();
    assert!(
        stopped_by.is_some(),
        "all {MAX} announcements were acknowledged before Redis was killed"
    );

    c.redis[0].restart().await;
    c.t.restart(Role::PublicProxy);
    c.b.restart();
    c.t.proc_mut(Role::PublicProxy)
        .wait_for_log(FOLLOWING, PROCESS_WAIT)
        .await;
    c.b.wait_for_log(FOLLOWING, PROCESS_WAIT).await;
    let in_redis = c.stored().await.unwrap_or_default();
    for (name, client) in [("A", c.a_rpc()), ("B", c.b_rpc())] {
        let listed = Instances::listed(&client)
            .await
            .unwrap_or_else(|e| panic!("getAnnouncements at {name}: {e}"));
        let missing: Vec<&String> = acked.iter().filter(|d| !listed.contains(d)).collect();
        assert!(
            missing.is_empty(),
            "instance {name} lost {} of {} acknowledged announcements: {missing:?}",
            missing.len(),
            acked.len()
        );
        assert!(listed.iter().any(|d| d == DOMAIN), "{name}: {listed:?}");
    }
    let last = acked.last().expect("some were acknowledged");
    assert!(c.b_works_for(last).await, "{last} is not routed at B");
    println!(
        "Redis store: {} announcements acknowledged, then Redis and both instances killed \
         (SIGKILL) and restarted: all back at both instances ({in_redis} entries in Redis, the \
         settings' domain included)",
        acked.len()
    );
}

/// True when `GET /jsonrpc` for `sni` through the public port `addr` gets the demo's answer.
async fn works_at(t: &Tunnel, addr: SocketAddr, sni: &str) -> bool {
    matches!(
        https_request(addr, t.client_config(), sni, "GET", "/jsonrpc", b"", ATTEMPT_TIMEOUT).await,
        Ok(r) if r.status == 200 && r.body == SUCCESS.as_bytes()
    )
}

/// The `domain` of each entry of a `getAnnouncements` answer (or of a file store).
fn domains(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|l| {
            l.iter()
                .filter_map(|a| a["domain"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50, p99 and max of `v` (sorted in place).
fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.50), at(0.99), v[v.len() - 1])
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("OS random bytes");
    u32::from_le_bytes(b)
}
