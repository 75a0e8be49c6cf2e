//! The gRPC contracts between Parley's services. Each package is versioned (`parley.<service>.v1`); a
//! breaking change means a new version beside the old one, never an edit in place.
//!
//! This crate holds generated code, and the codec it uses ([`codec`]): no behaviour lives here.

#![allow(clippy::all)]

pub mod codec;

pub mod user {
    pub mod v1 {
        tonic::include_proto!("parley.user.v1");
    }
}

pub mod chat {
    pub mod v1 {
        tonic::include_proto!("parley.chat.v1");
    }
}

pub mod quota {
    pub mod v1 {
        tonic::include_proto!("parley.quota.v1");
    }
}

pub mod analytics {
    pub mod v1 {
        tonic::include_proto!("parley.analytics.v1");
    }
}

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("parley.agent.v1");
    }
}
