package driver

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
)

func TestKubeRecorder(t *testing.T) {
	got := make(chan coreEvent, 1)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/v1/namespaces/shop/events" || r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "unexpected "+r.URL.Path, http.StatusForbidden)
			return
		}
		var ev coreEvent
		if err := json.NewDecoder(r.Body).Decode(&ev); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		got <- ev
		w.WriteHeader(http.StatusCreated)
	}))
	defer srv.Close()
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	tok := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tok, []byte("tok\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	k, err := newKubeRecorder(srv.URL, ca, tok, "composefs.csi.dev", "node-1")
	if err != nil {
		t.Fatal(err)
	}
	k.PodEvent(context.Background(), PodInfo{Name: "web-0", Namespace: "shop", UID: "u1"}, true, ReasonFetchFailed, "image x: not found")
	ev := <-got
	if ev.InvolvedObject.Name != "web-0" || ev.InvolvedObject.UID != "u1" || ev.Type != "Warning" ||
		ev.Reason != ReasonFetchFailed || ev.Source.Host != "node-1" || ev.Metadata.GenerateName != "web-0." {
		t.Fatalf("event %+v", ev)
	}
}

func TestNotInCluster(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	if _, err := NewInClusterRecorder("c", "n"); err != ErrNotInCluster {
		t.Fatalf("got %v, want ErrNotInCluster", err)
	}
}
