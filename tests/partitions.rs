//! Partitions on one Redis: the one-partition layout every deployment had before partitions,
//! and the partition count fixed once written (a deployment from before counts as one).

mod common;

use common::app::{inr, spawn_app_with};
use redis::AsyncCommands;
use tarspay_worker::config::Settings;
use tarspay_worker::deployment::{Deployment, DeploymentError, outcome_streams_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_partition_keeps_the_layout_of_before_partitions() {
    let app = spawn_app_with(false, |_| {}, &[("TARSPAY_PARTITIONS", "1")]).await;
    let pool = app.pool(4);
    for n in 0..5 {
        app.enqueue(inr(&format!("ONE-{n}"), "100")).await;
    }
    let outcomes = app.wait_outcomes(5).await;
    pool.stop().await;
    assert!(outcomes.values().all(|o| o.status == "succeeded"));
    let mut conn = app.redis.conn().await;
    let entries: u64 = conn.xlen("{apptest:payouts}:outcomes").await.unwrap();
    assert_eq!(entries, 5);
    let streams: Vec<String> = conn
        .zrange(outcome_streams_key("apptest"), 0, -1)
        .await
        .unwrap();
    assert_eq!(streams, ["{apptest:payouts}:outcomes"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_count_is_fixed_once_written_and_an_old_deployment_counts_as_one() {
    let app = spawn_app_with(false, |_| {}, &[]).await;
    let settings_with = |partitions: &str| {
        let mut env = app.env.clone();
        env.retain(|(k, _)| k != "TARSPAY_PARTITIONS");
        env.push(("TARSPAY_PARTITIONS".into(), partitions.into()));
        Settings::load_with_env(None, env).unwrap()
    };
    let refused = Deployment::connect(&settings_with("2")).await.err();
    assert!(
        matches!(&refused, Some(DeploymentError::PartitionMismatch { stored, configured: 2, .. }) if stored == "3"),
        "{:?}",
        refused.map(|e| e.to_string())
    );

    // A deployment from before partitions: its queue exists, the record does not.
    let mut env = app.env.clone();
    env.retain(|(k, _)| k != "TARSPAY_QUEUE_PREFIX");
    env.push(("TARSPAY_QUEUE_PREFIX".into(), "legacy".into()));
    let mut conn = app.redis.conn().await;
    let _: String = conn
        .xadd("{legacy:payouts}:stream", "*", &[("e", "{}")])
        .await
        .unwrap();
    let legacy = |partitions: &str| {
        let mut env = env.clone();
        env.retain(|(k, _)| k != "TARSPAY_PARTITIONS");
        env.push(("TARSPAY_PARTITIONS".into(), partitions.into()));
        Settings::load_with_env(None, env).unwrap()
    };
    let refused = Deployment::connect(&legacy("4")).await.err();
    assert!(
        refused
            .as_ref()
            .is_some_and(|e| e.to_string().contains("written with 1 partition(s)")),
        "{:?}",
        refused.map(|e| e.to_string())
    );
    assert!(Deployment::connect(&legacy("1")).await.is_ok());
}
