//! The real `vfvm-agent` binary serving the agent API over a Unix socket, configuring
//! interfaces in a throwaway network namespace: the host-side test of the protocol
//! server (the lab boots it as PID 1 of a guest and talks to it over vsock).

use std::time::Duration;

use vfvm_netlink::{Handle, Netns};
use vfvm_protocols::agent;

mod common;
use common::{code, RunningAgent};

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(Duration::from_secs(10).as_nanos()).unwrap())
}

fn fixture(name: &str) -> RunningAgent {
    RunningAgent::start("vfvm-agent", name)
}

fn interface(name: &str, mac: &str, cidrs: &[&str]) -> agent::UpdateInterfaceRequest {
    let mut i = agent::Interface::new();
    i.name = name.into();
    i.match_mac = mac.into();
    i.mtu = 1400;
    i.addresses = cidrs.iter().map(|c| agent::IpAddress { cidr: c.to_string(), ..Default::default() }).collect();
    i.wait_timeout_ms = 2000;
    let mut req = agent::UpdateInterfaceRequest::new();
    req.interface = Some(i).into();
    req
}

#[test]
fn the_agent_serves_health_details_and_network_config() {
    let f = fixture("net");
    let h = f.client.health(ctx(), &agent::HealthRequest::new()).unwrap();
    assert_eq!((h.agent_version.as_str(), h.api_version.as_str()), (env!("CARGO_PKG_VERSION"), "vfvm.agent.v1"));
    let d = f.client.guest_details(ctx(), &agent::GuestDetailsRequest::new()).unwrap();
    assert!(!d.kernel_release.is_empty() && d.memory_bytes > 0 && d.cpus > 0, "{d:?}");

    // A NIC that "appears" in the guest: a veth with a known MAC.
    let ns = Netns::open(format!("/run/netns/{}", f.netns)).unwrap();
    let h = Handle::in_netns(&ns).unwrap();
    h.create_veth("vt0", "vt0peer", None).unwrap();
    let vt0 = h.link_by_name("vt0").unwrap();
    h.set_link_mac(vt0.index, "02:00:00:00:aa:01".parse().unwrap()).unwrap();

    for _ in 0..2 {
        // The second call must change nothing and succeed.
        f.client.update_interface(ctx(), &interface("eth0", "02:00:00:00:aa:01", &["198.18.5.2/24", "2001:db8:5::2/64"])).unwrap();
        let l = h.link_by_index(vt0.index).unwrap();
        assert_eq!((l.name.as_str(), l.mtu, l.admin_up), ("eth0", 1400, true));
        let mut addrs: Vec<String> = h
            .addresses(vt0.index)
            .unwrap()
            .iter()
            .filter(|a| !a.addr.to_string().starts_with("fe80"))
            .map(|a| format!("{}/{}", a.addr, a.prefix_len))
            .collect();
        addrs.sort();
        assert_eq!(addrs, ["198.18.5.2/24", "2001:db8:5::2/64"]);
    }

    let mut routes = agent::UpdateRoutesRequest::new();
    let mut r = agent::Route::new();
    r.dest = "default".into();
    r.gateway = "198.18.5.1".into();
    r.device = "eth0".into();
    routes.routes = Some(agent::Routes { routes: vec![r], ..Default::default() }).into();
    f.client.update_routes(ctx(), &routes).unwrap();
    let defaults: Vec<_> = h.routes(vfvm_netlink::Family::V4).unwrap().into_iter().filter(|r| r.dst_len == 0).collect();
    assert_eq!(defaults.len(), 1);
    assert_eq!(defaults[0].gateway.map(|g| g.to_string()).as_deref(), Some("198.18.5.1"));

    let dns = agent::SetDnsRequest { servers: vec!["198.18.5.53".into()], searches: vec!["pod.example".into()], ..Default::default() };
    f.client.set_dns(ctx(), &dns).unwrap();
    let resolv = std::fs::read_to_string(f.dir.join("resolv.conf")).unwrap();
    assert!(resolv.contains("nameserver 198.18.5.53") && resolv.contains("search pod.example"), "{resolv}");
}

#[test]
fn bad_requests_get_clear_errors_and_the_agent_keeps_serving() {
    let f = fixture("bad");
    let err = f.client.update_interface(ctx(), &interface("eth0", "02:00:00:00:bb:01", &["300.1.1.1/33"])).unwrap_err();
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT, "{err:?}");
    assert!(format!("{err:?}").contains("300.1.1.1/33"), "{err:?}");

    let err = f.client.update_interface(ctx(), &agent::UpdateInterfaceRequest::new()).unwrap_err();
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT);

    // A device that never appears: a bounded wait, then DEADLINE_EXCEEDED.
    let mut req = interface("eth9", "02:00:00:00:cc:01", &["198.18.6.2/24"]);
    req.interface.as_mut().unwrap().wait_timeout_ms = 300;
    let err = f.client.update_interface(ctx(), &req).unwrap_err();
    assert_eq!(code(&err), ttrpc::Code::DEADLINE_EXCEEDED, "{err:?}");

    // A route via a gateway nothing reaches.
    let mut routes = agent::UpdateRoutesRequest::new();
    let mut r = agent::Route::new();
    r.dest = "198.19.0.0/16".into();
    r.gateway = "203.0.113.1".into();
    routes.routes = Some(agent::Routes { routes: vec![r], ..Default::default() }).into();
    let err = f.client.update_routes(ctx(), &routes).unwrap_err();
    assert!(matches!(code(&err), ttrpc::Code::INVALID_ARGUMENT | ttrpc::Code::FAILED_PRECONDITION), "{err:?}");
    assert!(format!("{err:?}").contains("203.0.113.1"), "{err:?}");

    // An empty container request: refused, naming the call.
    let err = f.client.create_container(ctx(), &agent::CreateContainerRequest::new()).unwrap_err();
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT, "{err:?}");
    assert!(format!("{err:?}").contains("CreateContainer"), "{err:?}");

    assert_eq!(f.client.health(ctx(), &agent::HealthRequest::new()).unwrap().api_version, "vfvm.agent.v1");
}
