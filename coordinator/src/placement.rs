//! Admission and placement under vSphere FT's limits: at most 8 vCPUs per FT VM, at most 4
//! secondaries per host (configurable), primary and secondary never on the same host. A
//! refusal names the limit and what each host lacks.
use crate::model::Cluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_vcpus_per_ft_vm: u8,
    pub max_secondaries_per_host: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_vcpus_per_ft_vm: 8,
            max_secondaries_per_host: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("{vcpus} vCPUs exceed the limit of {max} vCPUs per FT-protected VM")]
    TooManyVcpus { vcpus: u8, max: u8 },
    #[error("no host can take {what}: {why}")]
    NoHost { what: String, why: String },
}

/// FT admission: the VM's vCPU count.
pub fn check_ft_vcpus(vcpus: u8, limits: &Limits) -> Result<(), PlacementError> {
    if vcpus > limits.max_vcpus_per_ft_vm {
        return Err(PlacementError::TooManyVcpus {
            vcpus,
            max: limits.max_vcpus_per_ft_vm,
        });
    }
    Ok(())
}

/// A host for `vm`'s primary: the live host running the fewest primaries.
pub fn place_primary(cluster: &Cluster, vm: &str) -> Result<String, PlacementError> {
    let primaries = |h: &str| {
        cluster
            .vms
            .values()
            .filter(|v| v.primary.as_ref().is_some_and(|p| p.host == h))
            .count()
    };
    cluster
        .hosts
        .values()
        .filter(|h| h.alive)
        .min_by_key(|h| (primaries(&h.name), h.name.clone()))
        .map(|h| h.name.clone())
        .ok_or_else(|| PlacementError::NoHost {
            what: format!("the VM {vm}"),
            why: if cluster.hosts.is_empty() {
                "no host has registered".into()
            } else {
                "every host is down".into()
            },
        })
}

/// A host for `vm`'s secondary: live, not the primary's host, not in `avoid`, under the
/// per-host secondary limit; the least loaded such host.
pub fn place_secondary(
    cluster: &Cluster,
    vm: &str,
    limits: &Limits,
    avoid: &[&str],
) -> Result<String, PlacementError> {
    let v = cluster.vms.get(vm);
    let primary_host = v.and_then(|v| v.primary.as_ref()).map(|p| p.host.as_str());
    let current = v
        .and_then(|v| v.secondary.as_ref())
        .map(|p| p.host.as_str());
    let mut why = Vec::new();
    let mut best: Option<(usize, &str)> = None;
    for h in cluster.hosts.values() {
        let n = cluster.secondaries_on(&h.name) - usize::from(current == Some(h.name.as_str()));
        let refusal = if !h.alive {
            Some(if h.ds_alive {
                "is unreachable (isolated or partitioned)".to_string()
            } else {
                "is down".to_string()
            })
        } else if Some(h.name.as_str()) == primary_host {
            Some("runs the primary (primary and secondary never share a host)".to_string())
        } else if avoid.contains(&h.name.as_str()) {
            Some("is being moved away from".to_string())
        } else if n >= limits.max_secondaries_per_host {
            Some(format!(
                "already holds {n} secondaries (limit {} per host)",
                limits.max_secondaries_per_host
            ))
        } else {
            None
        };
        match refusal {
            Some(r) => why.push(format!("{} {r}", h.name)),
            None => {
                if best.is_none_or(|(bn, _)| n < bn) {
                    best = Some((n, &h.name));
                }
            }
        }
    }
    best.map(|(_, h)| h.to_string())
        .ok_or_else(|| PlacementError::NoHost {
            what: format!("the secondary of VM {vm}"),
            why: if why.is_empty() {
                "no host has registered".into()
            } else {
                why.join("; ")
            },
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FtState, Host, Placement, Vm};

    fn cluster(hosts: &[&str]) -> Cluster {
        let mut c = Cluster::default();
        for h in hosts {
            c.hosts.insert(
                h.to_string(),
                Host {
                    name: h.to_string(),
                    ip: "127.0.0.1".into(),
                    last_seen_ms: 0,
                    alive: true,
                    ds_alive: true,
                },
            );
        }
        c
    }

    fn vm(c: &mut Cluster, name: &str, primary: &str, secondary: Option<&str>) {
        let id = c.new_id();
        let place = |h: &str| Placement {
            host: h.into(),
            id,
            port: 0,
        };
        c.vms.insert(
            name.into(),
            Vm {
                name: name.into(),
                guest: Some("counter".into()),
                kernel: None,
                initrd: None,
                disk_mib: None,
                tap: None,
                mac: None,
                disk_file: None,
                cmdline: String::new(),
                vcpus: 2,
                mem_mib: 64,
                running: true,
                ft: FtState::Protected,
                primary: Some(place(primary)),
                secondary: secondary.map(place),
                last_failover: None,
                ended: None,
                failure: None,
            },
        );
    }

    #[test]
    fn nine_vcpus_refused_naming_the_limit() {
        let e = check_ft_vcpus(9, &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("limit of 8 vCPUs"), "{e}");
        assert!(check_ft_vcpus(8, &Limits::default()).is_ok());
    }

    #[test]
    fn secondary_never_on_the_primary_host_and_one_host_is_refused() {
        let mut c = cluster(&["h1"]);
        vm(&mut c, "a", "h1", None);
        let e = place_secondary(&c, "a", &Limits::default(), &[]).unwrap_err();
        assert!(e.to_string().contains("h1 runs the primary"), "{e}");
        let mut c = cluster(&["h1", "h2"]);
        vm(&mut c, "a", "h1", None);
        assert_eq!(
            place_secondary(&c, "a", &Limits::default(), &[]).unwrap(),
            "h2"
        );
    }

    #[test]
    fn fifth_secondary_on_a_host_is_refused() {
        let mut c = cluster(&["h1", "h2"]);
        for i in 0..4 {
            vm(&mut c, &format!("v{i}"), "h1", Some("h2"));
        }
        vm(&mut c, "v4", "h1", None);
        let e = place_secondary(&c, "v4", &Limits::default(), &[]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("h2 already holds 4 secondaries (limit 4 per host)"),
            "{msg}"
        );
        assert!(msg.contains("h1 runs the primary"), "{msg}");
        // Configurable.
        let five = Limits {
            max_secondaries_per_host: 5,
            ..Limits::default()
        };
        assert_eq!(place_secondary(&c, "v4", &five, &[]).unwrap(), "h2");
        assert_eq!(c.ft_vcpus_on("h2"), 8);
    }

    #[test]
    fn least_loaded_live_host_wins_and_dead_hosts_are_skipped() {
        let mut c = cluster(&["h1", "h2", "h3"]);
        vm(&mut c, "a", "h1", Some("h2"));
        vm(&mut c, "b", "h1", None);
        assert_eq!(
            place_secondary(&c, "b", &Limits::default(), &[]).unwrap(),
            "h3"
        );
        c.hosts.get_mut("h3").unwrap().alive = false;
        assert_eq!(
            place_secondary(&c, "b", &Limits::default(), &[]).unwrap(),
            "h2"
        );
        // Migrating a's secondary away from h2: only h3 is left, unreachable (its datastore
        // heartbeat still fresh) and then down; neither takes new processes.
        let e = place_secondary(&c, "a", &Limits::default(), &["h2"]).unwrap_err();
        assert!(e.to_string().contains("h3 is unreachable"), "{e}");
        c.hosts.get_mut("h3").unwrap().ds_alive = false;
        let e = place_secondary(&c, "a", &Limits::default(), &["h2"]).unwrap_err();
        assert!(e.to_string().contains("h3 is down"), "{e}");
        assert_eq!(place_primary(&c, "c").unwrap(), "h2");
    }
}
