package cfs

import (
	"reflect"
	"testing"
)

// TestNodeObjects: each digest once, in walk order, from the first regular
// file naming it; aliases, inline files and other types name none.
func TestNodeObjects(t *testing.T) {
	da, db := Digest{1}, Digest{2}
	root := &Node{Mode: ModeDir | 0o755}
	a := &Node{Name: "a", Mode: ModeRegular | 0o644, Size: 10, Digest: &da, Payload: da.ObjectPath()}
	sub := &Node{Name: "sub", Mode: ModeDir | 0o755}
	for _, c := range []*Node{a, sub, {Name: "inline", Mode: ModeRegular | 0o644, Size: 3, Content: []byte("abc")}} {
		if err := root.AddChild(c); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []*Node{
		{Name: "b", Mode: ModeRegular | 0o644, Size: 20, Digest: &db, Payload: db.ObjectPath()},
		{Name: "b-again", Mode: ModeRegular | 0o600, Size: 20, Digest: &db, Payload: db.ObjectPath()},
		{Name: "link-to-a", LinkTo: a},
		{Name: "sym", Mode: ModeSymlink | 0o777, Payload: "a"},
	} {
		if err := sub.AddChild(c); err != nil {
			t.Fatal(err)
		}
	}
	var firsts []string
	got := root.Objects(func(n *Node) { firsts = append(firsts, n.Path()) })
	want := []Object{{Digest: da, Size: 10, Path: da.ObjectPath()}, {Digest: db, Size: 20, Path: db.ObjectPath()}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("objects %+v, want %+v", got, want)
	}
	if want := []string{"/a", "/sub/b"}; !reflect.DeepEqual(firsts, want) {
		t.Errorf("first nodes %q, want %q", firsts, want)
	}
	if got := sub.Objects(nil); len(got) != 1 || got[0].Digest != db {
		t.Errorf("objects under /sub: %+v", got)
	}
}
