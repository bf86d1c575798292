package main

import "testing"

func TestCutTag(t *testing.T) {
	for _, tc := range []struct {
		ref, repo, tag string
		ok             bool
	}{
		{"example.test/csi-composefs:v1", "example.test/csi-composefs", "v1", true},
		{"localhost:5000/csi-composefs:dev", "localhost:5000/csi-composefs", "dev", true},
		{"localhost:5000/csi-composefs", "localhost:5000/csi-composefs", "", false},
		{"csi-composefs", "csi-composefs", "", false},
	} {
		repo, tag, ok := cutTag(tc.ref)
		if repo != tc.repo || tag != tc.tag || ok != tc.ok {
			t.Errorf("cutTag(%q) = %q, %q, %v; want %q, %q, %v", tc.ref, repo, tag, ok, tc.repo, tc.tag, tc.ok)
		}
	}
}
