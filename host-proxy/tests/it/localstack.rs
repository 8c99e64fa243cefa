//! The operator path, S3 and the enclave against LocalStack, a second
//! KMS and S3 implementation nobody on this project wrote (run without
//! Docker; see `support/localstack.rs`): the same checks as against moto.
//!
//! LocalStack's KMS, unlike moto's, answers a `Recipient` request with
//! `CiphertextForRecipient`, but not in KMS's CMS shape (DER
//! `EnvelopedData` version 0, the recipient named by issuer and serial
//! number, where KMS sends version 2 with a subject key identifier): the
//! enclave, which opens exactly KMS's shape, refuses it by name.

use crate::moto::{
    Mode, an_enclave_pointed_at_the_peer_refuses_the_load,
    encrypt_file_key_is_unwrapped_only_for_the_file,
    encrypt_per_value_is_opened_only_with_the_name_context, rotate_and_decrypt_against_the_peer,
};
use crate::s3::{
    S3Stack, concurrent_change_is_refused_and_kept,
    encrypt_rewrites_the_object_and_the_daemon_serves_it,
    loaded_followed_by_etag_and_kept_on_failure,
};
use crate::support::localstack::LocalStack;

/// What the enclave says about LocalStack's `CiphertextForRecipient`.
const CMS_SHAPE_REFUSED: &str =
    "CMS: cannot open CiphertextForRecipient: EnvelopedData version is 0, expected 2";

#[test]
fn the_operator_path_encrypt_rotate_decrypt_against_localstack_kms_and_s3() {
    let dir = tempfile::tempdir().unwrap();
    let localstack = LocalStack::start(dir.path());
    encrypt_per_value_is_opened_only_with_the_name_context(&localstack, dir.path());
    encrypt_file_key_is_unwrapped_only_for_the_file(&localstack, dir.path());
    rotate_and_decrypt_against_the_peer(&localstack, dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enclave_pointed_at_localstack_refuses_its_cms_shape() {
    let dir = tempfile::tempdir().unwrap();
    let localstack = LocalStack::start(dir.path());
    for mode in [Mode::PerValue, Mode::FileKey] {
        an_enclave_pointed_at_the_peer_refuses_the_load(
            &localstack,
            dir.path(),
            mode,
            CMS_SHAPE_REFUSED,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_on_localstack_s3_is_conditional_and_the_daemon_serves_it() {
    let mut s = S3Stack::start_with(|dir| Box::new(LocalStack::start(dir))).await;
    concurrent_change_is_refused_and_kept(&s).await;
    encrypt_rewrites_the_object_and_the_daemon_serves_it(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_localstack_s3_are_followed_by_etag() {
    let s = S3Stack::start_with(|dir| Box::new(LocalStack::start(dir))).await;
    loaded_followed_by_etag_and_kept_on_failure(s).await;
}
