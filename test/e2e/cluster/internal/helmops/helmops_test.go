package helmops

import "testing"

func TestParseSetKeepsTagsStrings(t *testing.T) {
	for _, tc := range []struct {
		name   string
		parse  func(map[string]any, ...string) error
		set    string
		string bool
	}{
		{"set-string, digits", ParseSetString, "image.tag=6749770", true},
		{"set-string, hex", ParseSetString, "image.tag=f11c67e", true},
		{"set, digits", ParseSet, "image.tag=6749770", false},
		{"set, hex", ParseSet, "image.tag=f11c67e", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vals := map[string]any{}
			if err := tc.parse(vals, tc.set); err != nil {
				t.Fatal(err)
			}
			_, isString := vals["image"].(map[string]any)["tag"].(string)
			if isString != tc.string {
				t.Errorf("%s: tag %#v, a string: %v, want %v", tc.set, vals["image"].(map[string]any)["tag"], isString, tc.string)
			}
		})
	}
}
