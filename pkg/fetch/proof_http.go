package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

var _ RangeSource = (*HTTPSource)(nil)

// OpenObjectRange GETs n bytes at off of BASE/objects/xx/yyyy… with a
// single-range request. A 206 must carry exactly that range of an object of
// size bytes (Content-Range); a 200 (the server ignores Range) must be the
// whole object.
func (s *HTTPSource) OpenObjectRange(ctx context.Context, d cfs.Digest, size uint64, off, n int64) (io.ReadCloser, bool, error) {
	if off < 0 || n <= 0 || uint64(off)+uint64(n) > size {
		return nil, false, fmt.Errorf("range %d+%d of an object of %d bytes", off, n, size)
	}
	const op = "fetching object range"
	resp, err := s.getURL(ctx, op, s.objectURL(d), "Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	if err != nil {
		return nil, false, err
	}
	loc := resp.Request.URL
	fail := func(err error) (io.ReadCloser, bool, error) {
		_, _ = io.CopyN(io.Discard, resp.Body, 4096)
		resp.Body.Close()
		return nil, false, &SourceError{Op: op, URL: loc.String(), Status: resp.StatusCode, Err: err}
	}
	if resp.StatusCode == http.StatusOK {
		if resp.ContentLength >= 0 && uint64(resp.ContentLength) != size {
			return fail(fmt.Errorf("server ignores Range and announces %d bytes, the image records %d", resp.ContentLength, size))
		}
		return httpBody{ReadCloser: resp.Body, op: "reading object", url: loc}, true, nil
	}
	cr := resp.Header.Get("Content-Range")
	first, last, total, err := parseContentRange(cr)
	if err != nil {
		return fail(err)
	}
	if first != off || last != off+n-1 || (total >= 0 && uint64(total) != size) {
		return fail(fmt.Errorf("asked for bytes %d-%d/%d, got Content-Range %q", off, off+n-1, size, cr))
	}
	if resp.ContentLength >= 0 && resp.ContentLength != n {
		return fail(fmt.Errorf("Content-Range %q with Content-Length %d", cr, resp.ContentLength))
	}
	return httpBody{ReadCloser: resp.Body, op: "reading object", url: loc}, false, nil
}

// ParseContentRange parses a Content-Range header value of a single range
// (see parseContentRange), for other sources' range requests.
func ParseContentRange(v string) (first, last, total int64, err error) { return parseContentRange(v) }

// parseContentRange parses a Content-Range header value of a single range
// of bytes (RFC 9110 14.4): "bytes FIRST-LAST/TOTAL", TOTAL being "*" when
// unknown (returned as -1). Only decimal digits are accepted for the
// positions, FIRST <= LAST, and LAST < TOTAL when TOTAL is known.
func parseContentRange(v string) (first, last, total int64, err error) {
	bad := func(why string) (int64, int64, int64, error) {
		return 0, 0, 0, fmt.Errorf("Content-Range %q: %s", v, why)
	}
	unit, rest, ok := strings.Cut(v, " ")
	if !ok || !strings.EqualFold(unit, "bytes") {
		return bad("not a byte range")
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return bad("no complete length")
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return bad("not FIRST-LAST")
	}
	if first, err = parseDecimal(a); err != nil {
		return bad("first position: " + err.Error())
	}
	if last, err = parseDecimal(b); err != nil {
		return bad("last position: " + err.Error())
	}
	if first > last {
		return bad("first position after the last")
	}
	if tot == "*" {
		return first, last, -1, nil
	}
	if total, err = parseDecimal(tot); err != nil {
		return bad("complete length: " + err.Error())
	}
	if last >= total {
		return bad("range beyond the complete length")
	}
	return first, last, total, nil
}

// parseDecimal accepts 1 to 18 decimal digits (no sign, no space).
func parseDecimal(s string) (int64, error) {
	if s == "" || len(s) > 18 {
		return 0, errors.New("not 1 to 18 digits")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, errors.New("not a decimal number")
		}
	}
	return strconv.ParseInt(s, 10, 64)
}
