package driver

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
)

// Volume attributes (PV volumeAttributes, inline csi.volumeAttributes).
const (
	AttrRepository = "repository" // base URL of an HTTP repository
	// AttrImage is the image name in the HTTP repository, or an OCI
	// reference (oci://REGISTRY/REPO:TAG, a composefs artifact;
	// docker://REGISTRY/REPO:TAG, a container image) without repository.
	AttrImage      = "image"
	AttrDigest     = "digest"     // expected fs-verity digest of the image (hex)
	AttrPullPolicy = "pullPolicy" // IfNotPresent (default), Always, Never
	AttrVerity     = "verity"     // require, userspace, off

	// kubeletPrefix marks the keys kubelet adds with podInfoOnMount.
	kubeletPrefix = "csi.storage.k8s.io/"
	attrPodName   = kubeletPrefix + "pod.name"
	attrPodNS     = kubeletPrefix + "pod.namespace"
	attrPodUID    = kubeletPrefix + "pod.uid"
	attrEphemeral = kubeletPrefix + "ephemeral"

	// maxContextBytes is the CSI limit of a map<string,string> field.
	maxContextBytes = 4096
)

// Keys of the nodePublishSecretRef secret.
const (
	SecretUsername     = "username"
	SecretPassword     = "password"
	SecretToken        = "token"
	SecretCA           = "ca.crt"
	SecretDockerConfig = ".dockerconfigjson"
)

// PullPolicy says when the image is fetched from the source.
type PullPolicy string

const (
	// PullIfNotPresent uses an image the node has (by digest, or by a name
	// it resolved before) and fetches it otherwise.
	PullIfNotPresent PullPolicy = "IfNotPresent"
	// PullAlways re-fetches the image by name on every publish; objects
	// the node has are still not fetched again.
	PullAlways PullPolicy = "Always"
	// PullNever uses only what the node has.
	PullNever PullPolicy = "Never"
)

// SourceKind names the kind of source a volume reads from.
type SourceKind string

// Source kinds.
const (
	// SourceHTTP is an HTTP repository (BASE/images/NAME, BASE/objects/xx/…).
	SourceHTTP SourceKind = "http"
	// SourceOCIArtifact is a registry repository of composefs artifacts
	// (URL oci://REGISTRY/REPO).
	SourceOCIArtifact SourceKind = "oci"
	// SourceOCIImage is a registry repository of container images,
	// converted on the node (URL docker://REGISTRY/REPO).
	SourceOCIImage SourceKind = "docker"
)

// SourceSpec says where a volume's image comes from. URL is canonical: it
// is what the allow-list is matched against and what keys shared fetches.
type SourceSpec struct {
	Kind SourceKind
	URL  string
}

// PodInfo is what kubelet tells about the pod (podInfoOnMount).
type PodInfo struct {
	Name, Namespace, UID string
	Ephemeral            bool
}

// VolumeSpec is a parsed, validated volume context.
type VolumeSpec struct {
	Source     SourceSpec
	Ref        fetch.ImageRef
	PullPolicy PullPolicy
	// Verity is the mode the attribute asks for; "" lets the node decide.
	Verity cfs.VerityMode
	Pod    PodInfo
}

// Key identifies what the volume shows: the same key at a target means
// the same content is (or will be) mounted there.
func (s VolumeSpec) Key() string {
	return string(s.Source.Kind) + " " + s.Source.URL + " " + s.Ref.String()
}

// Credentials come from the nodePublishSecretRef secret. They are never
// logged, nor put in errors.
type Credentials struct {
	Username, Password string
	Token              string
	CA                 []byte // PEM
	DockerConfig       []byte // .dockerconfigjson
}

// empty reports whether no credential is set.
func (c Credentials) empty() bool {
	return c.Username == "" && c.Password == "" && c.Token == "" && len(c.CA) == 0 && len(c.DockerConfig) == 0
}

// fingerprint is a hash of the credentials, to key cached sources
// without keeping the secrets themselves as keys.
func (c Credentials) fingerprint() string {
	if c.empty() {
		return ""
	}
	h := sha256.New()
	for _, s := range [][]byte{[]byte(c.Username), []byte(c.Password), []byte(c.Token), c.CA, c.DockerConfig} {
		fmt.Fprintf(h, "%d:", len(s))
		h.Write(s)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// invalidArg is an InvalidArgument status naming the field.
func invalidArg(field, format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, "%s: %s", field, fmt.Sprintf(format, args...))
}

// ParseVolumeContext validates the volume context and returns the volume
// it describes. Errors are InvalidArgument statuses naming the key; values
// are quoted only where they cannot carry a credential.
func ParseVolumeContext(vc map[string]string) (VolumeSpec, error) {
	var spec VolumeSpec
	total := 0
	for k, v := range vc {
		total += len(k) + len(v)
	}
	if total > maxContextBytes {
		return spec, invalidArg("volume_context", "%d bytes, more than the %d bytes CSI allows", total, maxContextBytes)
	}
	keys := make([]string, 0, len(vc))
	for k := range vc {
		keys = append(keys, k)
	}
	sort.Strings(keys) // report the same unknown key every time
	for _, k := range keys {
		switch k {
		case AttrRepository, AttrImage, AttrDigest, AttrPullPolicy, AttrVerity:
		default:
			if !strings.HasPrefix(k, kubeletPrefix) {
				return spec, invalidArg("volume_context", "unknown key %q (known: %s, %s, %s, %s, %s)",
					k, AttrRepository, AttrImage, AttrDigest, AttrPullPolicy, AttrVerity)
			}
		}
	}
	src, name, err := parseSource(vc)
	if err != nil {
		return spec, err
	}
	spec.Source = src

	if d := vc[AttrDigest]; d != "" {
		dg, err := cfs.ParseUserDigest(d)
		if err != nil {
			return spec, invalidArg(AttrDigest, "want the image's fs-verity digest, %d hex characters, not all zero", 2*cfs.DigestSize)
		}
		spec.Ref.Digest = dg
	}
	if name != "" {
		if err := fetch.ValidImageName(name); err != nil {
			return spec, invalidArg(AttrImage, "%v", err)
		}
		spec.Ref.Name = name
	}
	if spec.Ref.Name == "" && spec.Ref.Digest.IsZero() {
		return spec, invalidArg(AttrImage, "%s or %s is required", AttrImage, AttrDigest)
	}

	switch p := PullPolicy(vc[AttrPullPolicy]); p {
	case "":
		spec.PullPolicy = PullIfNotPresent
	case PullIfNotPresent, PullAlways, PullNever:
		spec.PullPolicy = p
	default:
		return spec, invalidArg(AttrPullPolicy, "%q: want %s, %s or %s", vc[AttrPullPolicy], PullIfNotPresent, PullAlways, PullNever)
	}
	if spec.PullPolicy == PullNever && spec.Ref.Digest.IsZero() && spec.Ref.Name == "" {
		return spec, invalidArg(AttrDigest, "required with %s=%s", AttrPullPolicy, PullNever)
	}

	if v, ok := vc[AttrVerity]; ok {
		m, err := cfs.ParseVerityMode(v)
		if err != nil || v == "" {
			return spec, invalidArg(AttrVerity, "%q: want require, userspace or off", v)
		}
		spec.Verity = m
	}
	if spec.Verity == cfs.VerityRequire && spec.Ref.Digest.IsZero() {
		return spec, invalidArg(AttrDigest, "required with %s=require (the kernel checks the image against it)", AttrVerity)
	}

	spec.Pod = PodInfo{
		Name:      vc[attrPodName],
		Namespace: vc[attrPodNS],
		UID:       vc[attrPodUID],
		Ephemeral: vc[attrEphemeral] == "true",
	}
	return spec, nil
}

// parseSource picks the source kind from the attributes, and returns the
// image's name in the source. It is the one place that knows which
// attributes name a source:
//   - repository: an HTTP repository; image (optional with digest) names
//     the image in it;
//   - image: oci://REGISTRY/REPO:TAG (or @sha256:…), without repository: a
//     composefs artifact; the name is the tag or manifest digest;
//   - image: docker://REGISTRY/REPO:TAG (or @sha256:…), without
//     repository: a container image converted on the node.
func parseSource(vc map[string]string) (SourceSpec, string, error) {
	img, hasImage := vc[AttrImage]
	if kind, ok := ociKind(img); hasImage && ok {
		if _, ok := vc[AttrRepository]; ok {
			return SourceSpec{}, "", invalidArg(AttrRepository, "not allowed with an %s:// %s (the reference names the registry)", kind, AttrImage)
		}
		ref, err := oci.ParseReference(img)
		if err != nil {
			return SourceSpec{}, "", invalidArg(AttrImage, "%v", err)
		}
		return SourceSpec{Kind: kind, URL: ref.Repo()}, ref.Name(), nil
	}
	repo, ok := vc[AttrRepository]
	if !ok || repo == "" {
		return SourceSpec{}, "", invalidArg(AttrRepository, "required (the base URL of the HTTP repository), unless %s is an oci:// or docker:// reference", AttrImage)
	}
	u, err := canonicalHTTPURL(repo)
	if err != nil {
		return SourceSpec{}, "", invalidArg(AttrRepository, "%v", err)
	}
	return SourceSpec{Kind: SourceHTTP, URL: u}, img, nil
}

// ociKind tells whether an image attribute is an OCI reference.
func ociKind(img string) (SourceKind, bool) {
	switch {
	case strings.HasPrefix(img, oci.SchemeArtifact+"://"):
		return SourceOCIArtifact, true
	case strings.HasPrefix(img, oci.SchemeImage+"://"):
		return SourceOCIImage, true
	}
	return "", false
}

// canonicalHTTPURL checks an HTTP repository URL and returns it with a
// lower-case scheme and host, a clean path and no trailing slash.
func canonicalHTTPURL(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("not a URL")
	}
	scheme := strings.ToLower(u.Scheme)
	if scheme != "http" && scheme != "https" {
		return "", fmt.Errorf("scheme must be http or https")
	}
	if u.User != nil {
		return "", fmt.Errorf("credentials in the URL are not allowed; use nodePublishSecretRef")
	}
	if u.Host == "" {
		return "", fmt.Errorf("no host")
	}
	for i := 0; i < len(u.Host); i++ {
		if c := u.Host[i]; c <= ' ' || c >= 0x7f {
			return "", fmt.Errorf("the host must be ASCII (an international name in its xn-- form)")
		}
	}
	if u.RawQuery != "" || u.Fragment != "" || u.ForceQuery {
		return "", fmt.Errorf("query and fragment are not allowed")
	}
	p := u.EscapedPath()
	for _, seg := range strings.Split(p, "/") {
		dec, err := url.PathUnescape(seg)
		if err != nil {
			return "", fmt.Errorf("bad escape in the path")
		}
		// Checked decoded, so %2e%2e cannot climb out of an allowed prefix.
		if dec == "." || dec == ".." || strings.ContainsAny(dec, "/\\") {
			return "", fmt.Errorf("the path must not contain . or .. segments or encoded slashes")
		}
	}
	if p != "" {
		p = path.Clean("/" + p)
	}
	p = strings.TrimSuffix(p, "/")
	return scheme + "://" + strings.ToLower(u.Host) + p, nil
}

// ParseSecrets reads the nodePublishSecretRef secret. Errors name the key,
// never the value. A value that cannot go in an HTTP header (a control
// character, as a newline inside a token) is invalid input, refused here
// rather than failing every request.
func ParseSecrets(secrets map[string]string) (Credentials, error) {
	var c Credentials
	keys := make([]string, 0, len(secrets))
	for k := range secrets {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := secrets[k]
		switch k {
		case SecretUsername:
			c.Username = v
			if strings.Contains(v, ":") {
				return c, invalidArg("secrets", "key %q: must not contain ':' (basic auth)", k)
			}
		case SecretPassword:
			c.Password = v
		case SecretToken:
			c.Token = strings.TrimSpace(v)
		case SecretCA:
			c.CA = []byte(v)
			if !x509.NewCertPool().AppendCertsFromPEM(c.CA) {
				return c, invalidArg("secrets", "key %q: no PEM certificate found", k)
			}
		case SecretDockerConfig:
			c.DockerConfig = []byte(v)
			if err := checkDockerConfig(c.DockerConfig); err != nil {
				return c, invalidArg("secrets", "key %q: %v", k, err)
			}
		default:
			return c, invalidArg("secrets", "unknown key %q (known: %s, %s, %s, %s, %s)",
				k, SecretUsername, SecretPassword, SecretToken, SecretCA, SecretDockerConfig)
		}
	}
	for _, f := range []struct{ key, v string }{
		{SecretUsername, c.Username}, {SecretPassword, c.Password}, {SecretToken, c.Token},
	} {
		if strings.ContainsFunc(f.v, isControl) {
			return c, invalidArg("secrets", "key %q: contains a control character (a newline inside the value?)", f.key)
		}
	}
	if c.Password != "" && c.Username == "" {
		return c, invalidArg("secrets", "key %q given without %q", SecretPassword, SecretUsername)
	}
	return c, nil
}

func isControl(r rune) bool { return r < ' ' || r == 0x7f }

// checkDockerConfig checks a .dockerconfigjson: JSON with an "auths" map
// whose entries give username and password, or auth = base64(user:pass),
// none with a control character. Errors name the registry, never a value.
func checkDockerConfig(raw []byte) error {
	var dc dockerConfig
	if err := json.Unmarshal(raw, &dc); err != nil {
		return fmt.Errorf("not a docker config JSON")
	}
	hosts := make([]string, 0, len(dc.Auths))
	for h := range dc.Auths {
		hosts = append(hosts, h)
	}
	sort.Strings(hosts)
	for _, h := range hosts {
		user, pass, err := dockerEntryAuth(dc.Auths[h])
		if err != nil {
			return fmt.Errorf("auths[%q]: %v", h, err)
		}
		if strings.ContainsFunc(user+pass, isControl) {
			return fmt.Errorf("auths[%q]: the credentials contain a control character", h)
		}
		if strings.Contains(user, ":") {
			return fmt.Errorf("auths[%q]: the username must not contain ':'", h)
		}
	}
	return nil
}

// AllowList holds the URL prefixes sources must start with.
type AllowList []string

// ParseAllowList splits a comma-separated list of URL prefixes.
func ParseAllowList(s string) (AllowList, error) {
	var out AllowList
	for _, p := range strings.Split(s, ",") {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		u, err := url.Parse(p)
		if err != nil || u.Scheme == "" || u.Host == "" {
			return nil, fmt.Errorf("allowed source %q: want a URL prefix such as https://repo.example.com/", p)
		}
		out = append(out, strings.ToLower(u.Scheme)+"://"+strings.ToLower(u.Host)+u.EscapedPath())
	}
	return out, nil
}

// Allows reports whether the source may be used. An empty list allows all.
// A prefix matches whole path elements: https://h/team/ allows
// https://h/team/app but not https://h/teamx.
func (a AllowList) Allows(src SourceSpec) bool {
	if len(a) == 0 {
		return true
	}
	u := src.URL + "/"
	for _, p := range a {
		if !strings.HasSuffix(p, "/") {
			p += "/"
		}
		if strings.HasPrefix(u, p) {
			return true
		}
	}
	return false
}

// SourceFactory makes the fetch.Source a volume reads from.
type SourceFactory func(spec SourceSpec, creds Credentials) (fetch.Source, error)

// NewSource is the SourceFactory of a node without an allow-list.
func NewSource(spec SourceSpec, creds Credentials) (fetch.Source, error) {
	return Sources{}.NewSource(spec, creds)
}

// NewSource is the SourceFactory of a node with this allow-list and no
// registry settings.
func (a AllowList) NewSource(spec SourceSpec, creds Credentials) (fetch.Source, error) {
	return Sources{Allow: a}.NewSource(spec, creds)
}

// Sources makes the sources volumes read from: the production
// SourceFactory is its NewSource.
type Sources struct {
	// Allow is applied again to every redirect an HTTP source follows.
	Allow AllowList
	// Registries: insecure (plain HTTP) registries and mirrors.
	Registries RegistryConfig
}

// NewSource makes the source of spec with the volume's credentials.
func (s Sources) NewSource(spec SourceSpec, creds Credentials) (fetch.Source, error) {
	switch spec.Kind {
	case SourceHTTP:
		return newHTTPSource(spec.URL, creds, s.Allow.allowsURL)
	case SourceOCIArtifact, SourceOCIImage:
		return newOCISource(spec, creds, s.Registries)
	}
	return nil, status.Errorf(codes.InvalidArgument, "source kind %q is not supported", spec.Kind)
}

// allowsURL applies the allow-list to a URL a redirect leads to (its query,
// as in a pre-signed link, does not matter).
func (a AllowList) allowsURL(u *url.URL) bool {
	c := *u
	c.User, c.RawQuery, c.Fragment, c.ForceQuery = nil, "", "", false
	canon, err := canonicalHTTPURL(c.String())
	if err != nil {
		return false
	}
	return a.Allows(SourceSpec{Kind: SourceHTTP, URL: canon})
}

func newHTTPSource(base string, creds Credentials, allowRedirect func(*url.URL) bool) (fetch.Source, error) {
	opts := fetch.HTTPOptions{Username: creds.Username, Password: creds.Password, BearerToken: creds.Token, AllowRedirect: allowRedirect}
	if opts.Username == "" && opts.BearerToken == "" && len(creds.DockerConfig) > 0 {
		u, _ := url.Parse(base)
		user, pass, ok := dockerConfigAuth(creds.DockerConfig, u.Host)
		if ok {
			opts.Username, opts.Password = user, pass
		}
	}
	if len(creds.CA) > 0 {
		t, err := transportWithCA(creds.CA)
		if err != nil {
			return nil, err
		}
		opts.Transport = t
	}
	src, err := fetch.NewHTTPSource(base, opts)
	if errors.Is(err, fetch.ErrInvalidCredentials) {
		return nil, invalidArg("secrets", "%v", err)
	}
	if err != nil {
		return nil, invalidArg(AttrRepository, "%v", err)
	}
	return src, nil
}

// transportWithCA is an HTTPS transport trusting the system roots plus ca.
func transportWithCA(ca []byte) (http.RoundTripper, error) {
	t, err := fetch.NewTransport(ca, 64, 30*time.Second)
	if err != nil {
		return nil, invalidArg("secrets", "key %q: %v", SecretCA, err)
	}
	return t, nil
}

type dockerConfig struct {
	Auths map[string]dockerAuth `json:"auths"`
}

type dockerAuth struct {
	Auth     string `json:"auth"`
	Username string `json:"username"`
	Password string `json:"password"`
}

// dockerEntryAuth returns the credentials of one auths entry: username
// and password, or auth = base64(user:password).
func dockerEntryAuth(e dockerAuth) (user, pass string, err error) {
	if e.Username != "" || e.Auth == "" {
		return e.Username, e.Password, nil
	}
	b, err := base64.StdEncoding.DecodeString(e.Auth)
	if err != nil {
		return "", "", fmt.Errorf("auth is not base64")
	}
	user, pass, ok := strings.Cut(string(b), ":")
	if !ok {
		return "", "", fmt.Errorf("auth is not base64 of user:password")
	}
	return user, pass, nil
}

// dockerConfigAuth finds the credentials a .dockerconfigjson holds for
// host (entries may be a bare host or a URL).
func dockerConfigAuth(raw []byte, host string) (user, pass string, ok bool) {
	var dc dockerConfig
	if json.Unmarshal(raw, &dc) != nil {
		return "", "", false
	}
	keys := make([]string, 0, len(dc.Auths))
	for k := range dc.Auths {
		keys = append(keys, k)
	}
	sort.Strings(keys) // the same entry every time when two name the host
	for _, k := range keys {
		e := dc.Auths[k]
		h := k
		if u, err := url.Parse(k); err == nil && u.Host != "" {
			h = u.Host
		}
		if !strings.EqualFold(h, host) {
			continue
		}
		user, pass, err := dockerEntryAuth(e)
		return user, pass, err == nil && (user != "" || pass != "")
	}
	return "", "", false
}

// verityRank orders verity modes from weakest to strongest.
func verityRank(m cfs.VerityMode) int {
	switch m {
	case cfs.VerityRequire:
		return 2
	case cfs.VerityUserspace:
		return 1
	}
	return 0
}

// effectiveVerity is the mode a volume gets: what it asks for (userspace
// when it does not say), raised to the node's floor.
func effectiveVerity(asked, floor cfs.VerityMode) cfs.VerityMode {
	if asked == "" {
		asked = cfs.VerityUserspace
	}
	if verityRank(floor) > verityRank(asked) {
		return floor
	}
	return asked
}
