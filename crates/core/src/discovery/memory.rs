//! In-process discovery for `lmgrid up`: every service runs in one process,
//! so membership is a shared table with change notification, and so are the
//! model records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::{
    Discovery, Instance, Members, Membership, ModelRecord, ModelRecords, ModelTable, Registration,
    Result,
};

/// Discovery within one process. Cloning shares the tables.
#[derive(Debug, Clone)]
pub struct MemoryDiscovery {
    services: Arc<Mutex<HashMap<String, watch::Sender<Members>>>>,
    models: watch::Sender<ModelRecords>,
}

impl Default for MemoryDiscovery {
    fn default() -> Self {
        MemoryDiscovery {
            services: Arc::default(),
            models: watch::Sender::new(ModelRecords::default()),
        }
    }
}

impl MemoryDiscovery {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores the record of `model` (what the registry does in a cluster).
    /// An invalid record is refused with the reason.
    pub fn set_model(&self, model: &str, record: ModelRecord) -> Result<(), String> {
        record.validate()?;
        self.models.send_modify(|records| {
            Arc::make_mut(records).insert(model.to_string(), record);
        });
        Ok(())
    }

    /// Removes the record of `model`.
    pub fn remove_model(&self, model: &str) {
        self.models.send_if_modified(|records| {
            records.contains_key(model) && Arc::make_mut(records).remove(model).is_some()
        });
    }

    fn sender(&self, service: &str) -> watch::Sender<Members> {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services
            .entry(service.to_string())
            .or_insert_with(|| watch::Sender::new(Members::default()))
            .clone()
    }
}

#[async_trait::async_trait]
impl Discovery for MemoryDiscovery {
    async fn register(&self, instance: Instance) -> Result<Box<dyn Registration>> {
        let sender = self.sender(&instance.service);
        publish(&sender, &instance);
        Ok(Box::new(MemoryRegistration {
            sender,
            instance,
            active: true,
        }))
    }

    async fn watch(&self, service: &str) -> Result<Membership> {
        Ok(Membership::new(service, self.sender(service).subscribe()))
    }

    async fn watch_models(&self) -> Result<ModelTable> {
        Ok(ModelTable::new(self.models.subscribe()))
    }
}

fn publish(sender: &watch::Sender<Members>, instance: &Instance) {
    sender.send_modify(|members| {
        Arc::make_mut(members).insert(instance.id.clone(), instance.clone());
    });
}

#[derive(Debug)]
struct MemoryRegistration {
    sender: watch::Sender<Members>,
    instance: Instance,
    active: bool,
}

impl MemoryRegistration {
    fn remove(&mut self) {
        if std::mem::take(&mut self.active) {
            let id = &self.instance.id;
            self.sender.send_modify(|members| {
                Arc::make_mut(members).remove(id);
            });
        }
    }
}

#[async_trait::async_trait]
impl Registration for MemoryRegistration {
    fn instance(&self) -> &Instance {
        &self.instance
    }

    async fn update(&mut self, instance: Instance) -> Result<()> {
        self.instance = instance;
        publish(&self.sender, &self.instance);
        Ok(())
    }

    async fn deregister(mut self: Box<Self>) -> Result<()> {
        self.remove();
        Ok(())
    }
}

impl Drop for MemoryRegistration {
    // In one process a "crashed" instance is simply gone: there is no lease to
    // run out, so dropping removes the record at once.
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Load;

    fn instance(id: &str) -> Instance {
        Instance {
            service: "worker".into(),
            id: id.into(),
            address: format!("127.0.0.1:{}", 7000 + id.len()),
            version: "test".into(),
            zone: None,
            models: vec![],
            load: None,
            metadata: Default::default(),
        }
    }

    #[tokio::test]
    async fn register_update_deregister_are_seen_by_watchers() {
        let discovery = MemoryDiscovery::new();
        let mut membership = discovery.watch("worker").await.unwrap();
        assert!(membership.members().is_empty());

        let mut a = discovery.register(instance("a")).await.unwrap();
        let b = discovery.register(instance("bb")).await.unwrap();
        let members = membership.wait_for(|m| m.len() == 2).await.unwrap();
        assert_eq!(members["a"].address, "127.0.0.1:7001");

        let mut loaded = instance("a");
        loaded.load = Some(Load {
            in_flight: 3,
            ..Load::default()
        });
        a.update(loaded).await.unwrap();
        let members = membership
            .wait_for(|m| m.get("a").is_some_and(|i| i.load.is_some()))
            .await
            .unwrap();
        assert_eq!(members["a"].load.as_ref().unwrap().in_flight, 3);

        a.deregister().await.unwrap();
        drop(b);
        membership.wait_for(|m| m.is_empty()).await.unwrap();
        // Model records are one more shared table.
        let mut models = discovery.watch_models().await.unwrap();
        let record = ModelRecord {
            aliases: [("stable".to_string(), "1".to_string())].into(),
            traffic: Vec::new(),
        };
        discovery.set_model("m", record.clone()).unwrap();
        let records = models.wait_for(|r| r.contains_key("m")).await.unwrap();
        assert_eq!(records["m"], record);
        let zero = ModelRecord {
            traffic: vec![crate::discovery::TrafficWeight {
                version: "1".into(),
                weight: 0,
            }],
            ..ModelRecord::default()
        };
        assert!(discovery.set_model("m", zero).is_err());
        discovery.remove_model("m");
        models.wait_for(|r| r.is_empty()).await.unwrap();
        // Other services are separate tables.
        assert!(
            discovery
                .watch("gateway")
                .await
                .unwrap()
                .members()
                .is_empty()
        );
    }
}
