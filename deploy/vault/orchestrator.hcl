# Whoever starts the m2mguard broker (a deploy pipeline, an init step, a
# scheduler): it may create secret_ids of the broker's AppRole, and only
# response-wrapped ones, so that a secret_id is never seen by anything but
# the broker that unwraps it. Vault refuses a request here without
# -wrap-ttl, or with one outside 10 s to 10 min.
# (AppRole mount "approle", role "m2mguard-broker"; change the path if yours differ.)
path "auth/approle/role/m2mguard-broker/secret-id" {
  capabilities     = ["update"]
  min_wrapping_ttl = "10s"
  max_wrapping_ttl = "10m"
}

# The role_id is not secret on its own; the orchestrator hands it over too.
path "auth/approle/role/m2mguard-broker/role-id" {
  capabilities = ["read"]
}
