//! The other sidecar meshes end to end (#19): Linkerd, Kuma and Consul pods
//! simulated with their own capture rules, proxy containers, uids and
//! ports (`testbed::rules`), the agent classifying their start-up,
//! shutdown and inbound races under their profiles.
//!
//! Why: a profile is only right if the agent, reading it, finds the real
//! mesh's race with the exact counts the app and the proxy saw. The bed is
//! written from each mesh's sources, not from the profiles, so a profile
//! that drifts from the mesh fails here.

use std::time::Duration;

use connscope::testbed::{
    client::responses,
    rules::MeshBed,
    scenario::{App, Server},
};

use crate::fixture::{Node, start_sidecar};

/// The bed itself on the real kernel, per mesh and without the agent: the
/// app's dials reach the upstream through the stand-in proxy (so the rules
/// redirect to the mesh's outbound port and exempt the proxy's uid), and a
/// client's requests to the pod reach the app through the proxy's inbound
/// port, dialed from the mesh's source (so its rules let that dial out).
#[test]
fn each_mesh_bed_captures_through_its_proxy() {
    let Some(node) = Node::shared() else { return };
    for mesh in [MeshBed::linkerd(), MeshBed::kuma(), MeshBed::consul()] {
        let name = format!("bed-{}-7d9f8c6b5-q2w3e", mesh.name);
        let mut pod = node.mesh_pod(&name, mesh.clone());
        // Before the proxy listens, the app's dials are refused: capture.
        let early = pod
            .run_app(&App {
                attempts: 1,
                ..App::default()
            })
            .unwrap();
        assert!(
            !early[0].ok,
            "{}: captured, nothing listens: {early:?}",
            mesh.name
        );
        start_sidecar(&mut pod, 0, 0);
        pod.wait_sidecar(mesh.inbound_port, "listen", Duration::from_secs(10))
            .unwrap();
        let out = pod
            .run_app(&App {
                attempts: 1,
                ..App::default()
            })
            .unwrap();
        assert!(out[0].ok, "{}: through the proxy: {out:?}", mesh.name);
        let mut app = pod.start_server(&Server::default()).unwrap();
        app.wait_line("\"state\":\"listen\"", Duration::from_secs(10))
            .unwrap();
        let mut c = pod.spawn_client(3, 50, 0).unwrap();
        let rs = responses(&c.wait_exit(Duration::from_secs(30)).unwrap());
        assert_eq!(rs.len(), 3, "{}: {rs:?}", mesh.name);
        assert!(
            rs.iter().all(|r| r.status == 200),
            "{}: the app served through the proxy: {rs:?}",
            mesh.name
        );
        let s = pod.sidecar.as_mut().unwrap();
        s.wait_lines("three proxied dials", Duration::from_secs(5), |l| {
            connscope::testbed::inbound::dials(l)
                .iter()
                .any(|d| d.proxied_total == 3)
        })
        .unwrap();
    }
}
