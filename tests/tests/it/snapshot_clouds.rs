//! A VM between two clouds that cannot reach each other, through two S3
//! services (two moto servers, each its own endpoint and keys): the agents
//! reach each bucket with the profile of the AWS shared files their
//! operator chose for it (`--snapshot-profile s3://BUCKET=PROFILE`). `a`
//! pushes to the first service, copies the snapshot — streamed, unopened —
//! to the second, and `b` restores it from there. A bucket whose profile
//! is missing is refused naming the profile.

use convoy_agent::s3lab::S3Server;
use convoy_agent::snapshot::profile::{parse_mapping, StoreProfiles};
use convoy_agent::snapshot::store::S3Options;
use convoy_agent::snapshot::SnapshotStore;
use convoy_protocol::ctl::snapshot::{PullRequest, PushRequest, SnapshotRequest, SnapshotResponse};
use convoy_protocol::ctl::VmState;
use convoy_tests::sim_spec;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_between_two_s3_services_each_reached_with_its_own_profile() {
    let test = "snapshot_clouds::a_vm_moves_between_two_s3_services";
    let Some(one) = S3Server::for_test(test).await.unwrap() else {
        return;
    };
    let Some(two) = S3Server::for_test(test).await.unwrap() else {
        return;
    };
    one.create_bucket("provider-one").await.unwrap();
    two.create_bucket("provider-two").await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let (credentials, config) = (
        files.path().join("credentials"),
        files.path().join("config"),
    );
    std::fs::write(
        &credentials,
        "[one]\naws_access_key_id = key-one\naws_secret_access_key = secret-one\n\
         [two]\naws_access_key_id = key-two\naws_secret_access_key = secret-two\n",
    )
    .unwrap();
    std::fs::write(
        &config,
        format!(
            "[profile one]\nregion = us-east-1\nendpoint_url = http://{}\n\
             [profile two]\nregion = eu-west-1\nendpoint_url = http://{}\n",
            one.addr(),
            two.addr()
        ),
    )
    .unwrap();
    let mut profiles = StoreProfiles {
        credentials_file: Some(credentials),
        config_file: Some(config),
        ..Default::default()
    };
    for m in [
        "s3://provider-one=one",
        "s3://provider-two=two",
        "s3://provider-three=three",
    ] {
        let (bucket, profile) = parse_mapping(m).unwrap();
        profiles.buckets.insert(bucket, profile);
    }
    let (_dir, lab) = convoy_tests::lab_with(&["a", "b"], |_, cfg| {
        cfg.snapshot_profiles = profiles.clone();
    })
    .await;
    let (a, b) = (
        lab.client("a").await.unwrap(),
        lab.client("b").await.unwrap(),
    );
    let (from, to) = ("s3://provider-one/eu", "s3://provider-two/us");
    b.snapshot(SnapshotRequest::Enroll { url: from.into() })
        .await
        .unwrap();
    a.vm_create(sim_spec("web", 16 << 20, 0)).await.unwrap();
    match a
        .snapshot(SnapshotRequest::Push(PushRequest {
            vm: "web".parse().unwrap(),
            url: from.into(),
            recipients: vec!["b".parse().unwrap()],
            live: false,
        }))
        .await
        .unwrap()
    {
        SnapshotResponse::Pushed(p) => assert!(p.uploaded > 0),
        other => panic!("{other:?}"),
    }
    let copied = match a
        .snapshot(SnapshotRequest::Copy {
            url: from.into(),
            to: to.into(),
            snapshot: None,
        })
        .await
        .unwrap()
    {
        SnapshotResponse::Copied(c) => c,
        other => panic!("{other:?}"),
    };
    // Two services: through the agent, not by either server.
    assert!(!copied.server_side, "{copied:?}");
    assert!(copied.bytes_streamed > 0 && copied.chunks_copied > 0);
    // The objects are on the second server, in its bucket.
    let direct = SnapshotStore::open_with(
        to,
        &S3Options {
            config: two.config(),
            retry: None,
        },
    )
    .unwrap();
    assert_eq!(direct.list("manifests").await.unwrap().len(), 1);
    assert!(!direct.list("chunks").await.unwrap().is_empty());
    match b
        .snapshot(SnapshotRequest::Pull(PullRequest {
            url: to.into(),
            snapshot: None,
            vm: None,
            paused: false,
        }))
        .await
        .unwrap()
    {
        SnapshotResponse::Pulled(p) => assert_eq!(p.vm.state, VmState::Running),
        other => panic!("{other:?}"),
    }
    // A bucket mapped to a profile the files do not hold.
    let e = a
        .snapshot(SnapshotRequest::List {
            url: "s3://provider-three/x".into(),
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("profile \"three\""), "{e}");
    lab.shutdown().await;
}
