package cli

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/services"
)

func fileSHA256(f *os.File) ([]byte, error) {
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, 1<<62)); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

func humanBytes(n uint64) string { return services.HumanBytes(n) }

// dash is s, or "-" for an empty cell.
func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// nanos is a duration in nanoseconds for a table ("-": none).
func nanos(n int64) string {
	if n == 0 {
		return "-"
	}
	return time.Duration(n).Round(time.Millisecond).String()
}

// age is the time since a Unix time in nanoseconds, to the second.
func age(unixNano int64) string {
	if unixNano == 0 {
		return "-"
	}
	return time.Since(time.Unix(0, unixNano)).Round(time.Second).String()
}

// errStop ends follow early without an error.
var errStop = errors.New("stop")

// follow hands every message of a stream to fn until the stream ends
// (io.EOF) or fn returns errStop.
func follow[T any](recv func() (T, error), fn func(T) error) error {
	for {
		m, err := recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err == nil {
			err = fn(m)
		}
		if errors.Is(err, errStop) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// each runs fn on every argument, printing "DONE ARG" after each: the rm
// verbs.
func each(cmd *cobra.Command, args []string, done string, fn func(arg string) error) error {
	for _, a := range args {
		if err := fn(a); err != nil {
			return err
		}
		fmt.Fprintln(cmd.OutOrStdout(), done, a)
	}
	return nil
}

// changes describes how m differs from prev, one line per field in the
// message's order: "state: CREATING -> RUNNING"; every set field ("plant:
// p1") when prev is nil. vm watch prints these instead of the whole
// classad each time.
func changes(prev, m proto.Message) []string {
	was, now := fieldTexts(prev), fieldTexts(m)
	var out []string
	fields := m.ProtoReflect().Descriptor().Fields()
	for i := range fields.Len() {
		name := fields.Get(i).JSONName()
		o, n := was[name], now[name]
		switch {
		case o == n:
		case prev == nil:
			out = append(out, name+": "+n)
		default:
			out = append(out, fmt.Sprintf("%s: %s -> %s", name, dash(o), dash(n)))
		}
	}
	return out
}

// fieldTexts maps the set fields of m to their values as compact JSON
// (strings unquoted, enums without their type's prefix).
func fieldTexts(m proto.Message) map[string]string {
	out := map[string]string{}
	if m == nil {
		return out
	}
	b, err := protojson.Marshal(m)
	if err != nil {
		return out
	}
	var fields map[string]json.RawMessage
	if json.Unmarshal(b, &fields) != nil {
		return out
	}
	for k, raw := range fields {
		var s string
		if json.Unmarshal(raw, &s) == nil {
			if i := strings.Index(s, "_STATE_"); i >= 0 && strings.ToUpper(s) == s {
				s = s[i+len("_STATE_"):]
			}
			out[k] = s
			continue
		}
		var compact strings.Builder
		_ = json.NewEncoder(&compact).Encode(raw)
		out[k] = strings.TrimSpace(compact.String())
	}
	return out
}
