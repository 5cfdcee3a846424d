//! Hardening #8.2: refresh tokens used concurrently. On SQLite a
//! transaction that reads before it writes must take the write lock up
//! front, or concurrent refreshes fail with "database is locked" (500);
//! and reuse detection must hold under the race.

use reqwest::StatusCode;

use crate::helpers::{TestApp, db_tests};

db_tests!(many_users_refreshing_at_once_never_get_a_server_error, of_ten_concurrent_uses_of_one_token_exactly_one_wins,);

async fn many_users_refreshing_at_once_never_get_a_server_error(app: TestApp) {
    let mut users = Vec::new();
    for _ in 0..20 {
        users.push(app.signup().await);
    }
    for round in 0..3 {
        let refreshes = users.iter().map(|u| app.refresh(&u.refresh_token));
        let answers = futures::future::join_all(refreshes).await;
        for (user, answer) in users.iter_mut().zip(answers) {
            assert_eq!(answer.status, StatusCode::OK, "round {round}: {}", answer.text);
            user.refresh_token = answer.str("refresh_token").to_owned();
        }
    }
}

async fn of_ten_concurrent_uses_of_one_token_exactly_one_wins(app: TestApp) {
    for _ in 0..3 {
        let user = app.signup().await;
        let answers = futures::future::join_all((0..10).map(|_| app.refresh(&user.refresh_token))).await;
        let statuses: Vec<StatusCode> = answers.iter().map(|a| a.status).collect();
        assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 1, "{statuses:?}");
        assert!(statuses.iter().all(|s| *s == StatusCode::OK || *s == StatusCode::UNAUTHORIZED), "{statuses:?}");
        // The losers were reuses: the whole login session is revoked.
        let winner = answers.iter().find(|a| a.status == StatusCode::OK).unwrap();
        app.refresh(winner.str("refresh_token")).await.assert_unauthorized();
    }
}
