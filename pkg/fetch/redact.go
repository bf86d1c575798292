package fetch

import (
	"net/url"
	"strings"
)

// redacted replaces what RedactURL hides.
const redacted = "REDACTED"

// RedactURL returns raw fit to leave the process (errors, logs, pod
// events): userinfo ("user:password@") and the query (a pre-signed link
// carries its signature there, as X-Amz-Signature=…) are replaced by
// REDACTED and the fragment is dropped. Scheme, host and path stay, so the
// message still says where the request went. Every URL the fetch and driver
// packages format goes through it.
func RedactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return redactUnparsed(raw)
	}
	return redactedURL(u)
}

func redactedURL(u *url.URL) string {
	c := *u
	if c.Opaque != "" {
		return c.Scheme + ":" + redacted
	}
	if c.User != nil {
		c.User = url.User(redacted)
	}
	if c.RawQuery != "" || c.ForceQuery {
		c.RawQuery, c.ForceQuery = redacted, false
	}
	c.Fragment, c.RawFragment = "", ""
	return c.String()
}

// redactUnparsed redacts a string url.Parse refused, by its shape: what
// follows ? or # goes, and so does everything before an @ in the authority.
// Control characters are dropped.
func redactUnparsed(s string) string {
	if i := strings.IndexAny(s, "?#"); i >= 0 {
		s = s[:i] + "?" + redacted
	}
	if i := strings.Index(s, "://"); i >= 0 {
		rest := s[i+3:]
		end := strings.IndexByte(rest, '/')
		if end < 0 {
			end = len(rest)
		}
		if at := strings.LastIndexByte(rest[:end], '@'); at >= 0 {
			s = s[:i+3] + redacted + "@" + rest[at+1:]
		}
	}
	return strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return -1
		}
		return r
	}, s)
}

// redactURLsIn redacts every http:// or https:// URL inside a message of
// another library (net/http quotes a Location header it cannot parse).
func redactURLsIn(msg string) string {
	var b strings.Builder
	for {
		i := indexURL(msg)
		if i < 0 {
			b.WriteString(msg)
			return b.String()
		}
		b.WriteString(msg[:i])
		end := strings.IndexAny(msg[i:], " \t\r\n\"'`<>")
		if end < 0 {
			end = len(msg) - i
		}
		b.WriteString(RedactURL(msg[i : i+end]))
		msg = msg[i+end:]
	}
}

func indexURL(s string) int {
	l := strings.ToLower(s)
	i, j := strings.Index(l, "http://"), strings.Index(l, "https://")
	switch {
	case i < 0:
		return j
	case j < 0:
		return i
	}
	return min(i, j)
}
