package cfs

import "testing"

func TestXXH32(t *testing.T) {
	// Reference values of the xxHash specification's XXH32.
	tests := []struct {
		in   string
		seed uint32
		want uint32
	}{
		{"", 0, 0x02CC5D05},
		{"a", 0, 0x550D7456},
		{"abc", 0, 0x32D153FF},
		{"Nobody inspects the spammish repetition", 0, 0xE2293B2F},
		{"", 1, 0x0B2CB792},
	}
	for _, tt := range tests {
		if got := xxh32([]byte(tt.in), tt.seed); got != tt.want {
			t.Errorf("xxh32(%q, %d) = %#08x, want %#08x", tt.in, tt.seed, got, tt.want)
		}
	}
}
