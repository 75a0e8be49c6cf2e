//! A fresh PostgreSQL database for one test, dropped when the guard is, also when the test panics.
//! `PARLEY_TEST_DATABASE_URL` names the server (default: the local one, trust authentication).

use sqlx::Connection;

pub struct TestDatabase {
    server: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates `<prefix>_<unique id>`.
    pub async fn create(prefix: &str) -> Result<Self, sqlx::Error> {
        // Tests have no configuration to take it from.
        #[allow(clippy::disallowed_methods)]
        let server = std::env::var("PARLEY_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
        let name = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
        let url = format!("{server}/{name}");
        crate::db::ensure_database(&url).await?;
        Ok(Self { server, name, url })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // A runtime of its own: the test's may be gone or unwinding.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let mut connection = sqlx::PgConnection::connect(&format!("{server}/postgres")).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                    .execute(&mut connection)
                    .await
                    .ok()
            })
        });
        let _best_effort = dropped.join();
    }
}
