package trust

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParsePolicyErrors(t *testing.T) {
	k := newTestKey(t, "ecdsa")
	small := newTestKey(t, "rsa-1024")
	twoKeys := strings.Replace(policyYAML("https://h/a", true, k), "  keys:\n", "  keys:\n  - name: dup\n    publicKey: |\n"+indent(k.pem, 6), 1)
	cases := []struct {
		name, policy, want string
	}{
		{"unknown field", "sources:\n- prefix: https://h/a\n  requireSignatures: true\n", `trust policy: unknown field "requireSignatures"`},
		{"unknown top-level field", "source: []\n", `unknown field "source"`},
		{"not YAML", "sources: [", "trust policy"},
		{"no prefix", "sources:\n- requireSignature: false\n", "prefix: required"},
		{"bad scheme", "sources:\n- prefix: ftp://h/a\n", "scheme must be http, https, oci or docker"},
		{"credentials in prefix", "sources:\n- prefix: https://u:p@h/a\n", "without credentials"},
		{"query in prefix", "sources:\n- prefix: https://h/a?x=1\n", "without credentials, query or fragment"},
		{"no host", "sources:\n- prefix: oci:///a\n", "want scheme://host/path"},
		{"required without keys", policyYAML("https://h/a", true), "requireSignature without keys"},
		{"duplicate prefix", "sources:\n- prefix: https://H/a/\n- prefix: https://h/a\n", "the same prefix as sources[0]"},
		{"bad PEM", "sources:\n- prefix: https://h/a\n  keys:\n  - name: x\n    publicKey: nope\n", `keys[0] "x": no PEM block`},
		{"private key", "sources:\n- prefix: https://h/a\n  keys:\n  - name: x\n    publicKey: |\n      -----BEGIN PRIVATE KEY-----\n      AAAA\n      -----END PRIVATE KEY-----\n", "unknown Public key PEM file type"},
		{"RSA too small", policyYAML("https://h/a", false, small), "RSA key of 1024 bits is not supported"},
		{"two PEM blocks", "sources:\n- prefix: https://h/a\n  keys:\n  - name: x\n    publicKey: |\n" + indent(k.pem+k.pem, 6), "more than one PEM block"},
		{"the same key twice", twoKeys, "the same key as keys[0]"},
		{"too big", strings.Repeat("#", MaxPolicyBytes+1), "more than"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParsePolicy([]byte(c.policy))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("ParsePolicy: %v, want an error containing %q", err, c.want)
			}
		})
	}
}

func indent(s string, n int) string {
	pad := strings.Repeat(" ", n)
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		b.WriteString(pad + l + "\n")
	}
	return b.String()
}

func TestPolicyRuleLookup(t *testing.T) {
	k := newTestKey(t, "ecdsa")
	p, err := ParsePolicy([]byte(`
sources:
- prefix: "*"
  requireSignature: false
- prefix: HTTPS://Repo.Example.com/team
  requireSignature: true
  keys:
  - name: team
    publicKey: |
` + indent(k.pem, 6) + `
- prefix: https://repo.example.com/team/app/
- prefix: oci://registry.example.com/team
`))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct{ src, want string }{
		{"https://repo.example.com/team", "https://repo.example.com/team"},
		{"https://repo.example.com/team/other", "https://repo.example.com/team"},
		{"https://repo.example.com/team/app", "https://repo.example.com/team/app"},
		{"https://repo.example.com/team/app/v2", "https://repo.example.com/team/app"},
		{"https://repo.example.com/teamx", "*"}, // whole path elements only
		{"http://repo.example.com/team", "*"},   // another scheme is another source
		{"oci://registry.example.com/team/app", "oci://registry.example.com/team"},
		{"docker://registry.example.com/team/app", "*"}, // docker:// is not oci://
	}
	for _, c := range cases {
		r := p.Rule(c.src)
		if r == nil || r.Prefix != c.want {
			t.Errorf("Rule(%s) = %+v, want prefix %s", c.src, r, c.want)
		}
	}
	if r := p.Rule("https://repo.example.com/team"); !r.Require || len(r.Keys) != 1 || r.Keys[0].Name != "team" {
		t.Errorf("the team rule: %+v", r)
	}

	// Without the catch-all, an unmatched source has no rule.
	p2, err := ParsePolicy([]byte("sources:\n- prefix: https://h/a\n"))
	if err != nil {
		t.Fatal(err)
	}
	if r := p2.Rule("https://h/b"); r != nil {
		t.Errorf("Rule(https://h/b) = %+v, want none", r)
	}
	if r := (*Policy)(nil).Rule("https://h/a"); r != nil {
		t.Errorf("a nil policy has a rule: %+v", r)
	}
	empty, err := ParsePolicy(nil)
	if err != nil || empty.Rule("https://h/a") != nil {
		t.Errorf("empty policy: %v %+v", err, empty)
	}
}

func TestParsePublicKeyAlgorithms(t *testing.T) {
	for alg, want := range map[string]string{"ecdsa": "ecdsa-p256", "ecdsa-p384": "ecdsa-p384", "rsa": "rsa-2048", "ed25519": "ed25519"} {
		k := newTestKey(t, alg).key(t, "k")
		if k.Algorithm != want || len(k.ID) != 64 || k.Hint == "" {
			t.Errorf("%s: %+v", alg, k)
		}
	}
	// PKCS #1 "RSA PUBLIC KEY" is accepted too.
	k := newTestKey(t, "rsa")
	pub := k.priv.Public()
	if _, err := ParsePublicKey("pkcs1", pkcs1PEM(t, pub)); err != nil {
		t.Errorf("PKCS #1: %v", err)
	}
}

func TestWatcherReload(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "policy.yaml")
	k1, k2 := newTestKey(t, "ecdsa"), newTestKey(t, "ed25519")
	write := func(s string) {
		t.Helper()
		// As a ConfigMap volume does: a new file renamed over the old.
		tmp := filepath.Join(dir, ".tmp")
		if err := os.WriteFile(tmp, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := NewWatcher(path); err == nil {
		t.Fatal("NewWatcher of a missing file: no error")
	}
	write("sources: [")
	if _, err := NewWatcher(path); err == nil {
		t.Fatal("NewWatcher of a bad file: no error")
	}
	write(policyYAML("https://h/a", true, k1))
	w, err := NewWatcher(path)
	if err != nil {
		t.Fatal(err)
	}
	var notes []error
	w.OnReload = func(_ *Policy, err error) { notes = append(notes, err) }
	keyOf := func() string { return w.Policy().Rule("https://h/a").Keys[0].ID }
	first := keyOf()

	if changed, err := w.Reload(); changed || err != nil || len(notes) != 0 {
		t.Fatalf("unchanged file: changed %v, err %v, notes %v", changed, err, notes)
	}
	write(policyYAML("https://h/a", true, k2))
	if changed, err := w.Reload(); !changed || err != nil || keyOf() == first {
		t.Fatalf("changed file: changed %v, err %v", changed, err)
	}
	second := keyOf()
	// A bad edit keeps the last good policy, is reported once.
	write(policyYAML("https://h/a", true))
	if changed, err := w.Reload(); changed || err == nil || keyOf() != second {
		t.Fatalf("bad file: changed %v, err %v", changed, err)
	}
	if _, err := w.Reload(); err != nil {
		t.Fatalf("the same bad file is reported again: %v", err)
	}
	// A removed file too.
	os.Remove(path)
	if _, err := w.Reload(); err == nil || keyOf() != second {
		t.Fatalf("missing file: err %v", err)
	}
	write(policyYAML("https://h/a", false, k1))
	if changed, err := w.Reload(); !changed || err != nil || keyOf() != first || w.Policy().Rule("https://h/a").Require {
		t.Fatalf("fixed file: changed %v, err %v", changed, err)
	}
	if len(notes) != 4 || notes[0] != nil || notes[1] == nil || notes[2] == nil || notes[3] != nil {
		t.Errorf("OnReload saw %v, want ok, error, error, ok", notes)
	}
}
