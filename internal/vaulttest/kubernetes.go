package vaulttest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// TokenReview is a Kubernetes TokenReview API that knows the service
// accounts given to it, the one stand-in of the Kubernetes auth tests (Vault
// itself is real): Vault's kubernetes auth method posts every login's JWT to
// it, and it answers as the API server would.
type TokenReview struct {
	Addr string // http://127.0.0.1:<port>, Vault's kubernetes_host

	known   atomic.Pointer[map[string]ServiceAccount] // JWT -> account
	reviews atomic.Int64
}

// ServiceAccount names a Kubernetes service account.
type ServiceAccount struct {
	Namespace, Name, UID string
}

// StartTokenReview runs a TokenReview API until the test ends.
func StartTokenReview(t testing.TB) *TokenReview {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tr := &TokenReview{Addr: "http://" + ln.Addr().String()}
	tr.known.Store(&map[string]ServiceAccount{})
	mux := http.NewServeMux()
	mux.HandleFunc("POST /apis/authentication.k8s.io/v1/tokenreviews", tr.review)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return tr
}

// Reviews returns how many token reviews Vault asked for.
func (tr *TokenReview) Reviews() int64 { return tr.reviews.Load() }

// Issue returns a new service account token of sa, as the kubelet writes it
// into a pod (an ES256 JWT with the kubernetes.io claims of a projected
// token), and makes the API know it.
func (tr *TokenReview) Issue(t testing.TB, sa ServiceAccount) string {
	t.Helper()
	jwt := ServiceAccountJWT(t, sa)
	for {
		old := tr.known.Load()
		next := map[string]ServiceAccount{jwt: sa}
		for k, v := range *old {
			next[k] = v
		}
		if tr.known.CompareAndSwap(old, &next) {
			return jwt
		}
	}
}

func (tr *TokenReview) review(w http.ResponseWriter, r *http.Request) {
	tr.reviews.Add(1)
	var req struct {
		Spec struct {
			Token     string   `json:"token"`
			Audiences []string `json:"audiences"`
		} `json:"spec"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	status := map[string]any{"authenticated": false}
	if sa, ok := (*tr.known.Load())[req.Spec.Token]; ok {
		status = map[string]any{"authenticated": true, "audiences": req.Spec.Audiences, "user": map[string]any{
			"username": "system:serviceaccount:" + sa.Namespace + ":" + sa.Name, "uid": sa.UID,
			"groups": []string{"system:serviceaccounts", "system:serviceaccounts:" + sa.Namespace},
		}}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	json.NewEncoder(w).Encode(map[string]any{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})
}

// ServiceAccountJWT returns a projected service account token of sa: an
// ES256 JWT signed with a fresh key, with the claims the kubelet writes.
// Vault checks it only through the TokenReview API (no public keys are
// configured), as in a cluster.
func ServiceAccountJWT(t testing.TB, sa ServiceAccount) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	enc := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	now := time.Now().Unix()
	signed := enc(map[string]string{"alg": "ES256", "typ": "JWT", "kid": "vaulttest"}) + "." + enc(map[string]any{
		"aud": []string{"https://kubernetes.default.svc"}, "iss": "https://kubernetes.default.svc",
		"sub": "system:serviceaccount:" + sa.Namespace + ":" + sa.Name, "iat": now, "nbf": now, "exp": now + 3600,
		"kubernetes.io": map[string]any{"namespace": sa.Namespace, "serviceaccount": map[string]string{"name": sa.Name, "uid": sa.UID},
			"pod": map[string]string{"name": sa.Name + "-0", "uid": "c0ffee00-0000-4000-8000-000000000001"}},
	})
	digest := sha256.Sum256([]byte(signed))
	r, s, err := ecdsa.Sign(rand.Reader, key, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// EnableKubernetesAuth enables Vault's kubernetes auth method at
// "kubernetes", pointed at tr, and writes role, bound to sa, with the
// policy hcl (written as policy) and the token TTLs given ("" = Vault's
// defaults).
func (s *Server) EnableKubernetesAuth(t testing.TB, tr *TokenReview, role string, sa ServiceAccount, policy, hcl, ttl, maxTTL string) {
	t.Helper()
	c := s.Client(t)
	ctx := context.Background()
	if err := c.Sys().PutPolicyWithContext(ctx, policy, hcl); err != nil {
		t.Fatalf("vaulttest: put policy %s: %v", policy, err)
	}
	if err := c.Sys().EnableAuthWithOptionsWithContext(ctx, "kubernetes", &vault.EnableAuthOptions{Type: "kubernetes"}); err != nil {
		t.Fatalf("vaulttest: enable kubernetes auth: %v", err)
	}
	// No local service account of Vault's own, no issuer check: Vault runs
	// outside the cluster and asks tr about every token.
	if _, err := c.Logical().WriteWithContext(ctx, "auth/kubernetes/config", map[string]any{
		"kubernetes_host": tr.Addr, "disable_local_ca_jwt": true, "disable_iss_validation": true,
	}); err != nil {
		t.Fatalf("vaulttest: kubernetes auth config: %v", err)
	}
	params := map[string]any{"bound_service_account_names": sa.Name, "bound_service_account_namespaces": sa.Namespace, "token_policies": policy}
	if ttl != "" {
		params["token_ttl"] = ttl
	}
	if maxTTL != "" {
		params["token_max_ttl"] = maxTTL
	}
	if _, err := c.Logical().WriteWithContext(ctx, "auth/kubernetes/role/"+role, params); err != nil {
		t.Fatalf("vaulttest: kubernetes role %s: %v", role, err)
	}
}
