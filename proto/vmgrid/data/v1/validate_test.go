package datav1

import (
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
)

func TestValidatePath(t *testing.T) {
	long := strings.Repeat("c", MaxComponentLen)
	deep := strings.TrimSuffix(strings.Repeat("d/", MaxDepth), "/")
	for _, p := range []string{
		"a", "in/video.mp4", "A/b_c/d-e/f.g", ".hidden", "a/.b", "-x", "_", "a..b", "...",
		"x/y/z.tar.gz", long, long + "/" + long, deep,
		strings.Repeat(long+"/", 3) + long[:254] + "/x", // exactly MaxPathLen bytes
	} {
		if err := ValidatePath("path", p); err != nil {
			t.Errorf("ValidatePath(%q) = %v, want ok", p, err)
		}
	}
	cases := []struct {
		p    string
		want string // a word the message must contain
	}{
		{"", "required"},
		{"/", "absolute"},
		{"/etc/passwd", "absolute"},
		{"a/", "empty component"},
		{"a//b", "empty component"},
		{"..", `".."`},
		{"../x", `".."`},
		{"a/../b", `".."`},
		{"a/..", `".."`},
		{".", `"."`},
		{"a/./b", `"."`},
		{"a\x00b", "control character"},
		{"a\nb", "control character"},
		{"a\tb", "control character"},
		{"\x7f", "control character"},
		{"a\x1b[31m", "control character"},
		{"a b", "' '"},
		{"a\\b", `'\\'`},
		{"a:b", "':'"},
		{"a*", "'*'"},
		{"naïve", "'ï'"},
		{"C:/x", "':'"},
		{strings.Repeat("p", MaxPathLen+1), "limit is 1024"},
		{long + "c", "component 1"},
		{"a/" + long + "c", "component 2"},
		{deep + "/d", "components"},
	}
	for _, c := range cases {
		err := ValidatePath("files[2]", c.p)
		if err == nil {
			t.Errorf("ValidatePath(%q) accepted", c.p)
			continue
		}
		if !strings.Contains(err.Error(), "files[2]") {
			t.Errorf("ValidatePath(%q) = %q: the message does not name the field", c.p, err)
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("ValidatePath(%q) = %q: the message does not say %q", c.p, err, c.want)
		}
	}
}

func TestValidatePrefix(t *testing.T) {
	for _, p := range []string{"", "in", "in/", "in/vid", "a/b/"} {
		if err := ValidatePrefix("prefix", p); err != nil {
			t.Errorf("ValidatePrefix(%q) = %v", p, err)
		}
	}
	for _, p := range []string{"/", "/in", "in//", "../", "a/../", "a b"} {
		if err := ValidatePrefix("prefix", p); err == nil || !strings.Contains(err.Error(), "prefix") {
			t.Errorf("ValidatePrefix(%q) = %v, want an error naming prefix", p, err)
		}
	}
}

func TestValidateRequests(t *testing.T) {
	sum := make([]byte, DigestSize)
	cases := []struct {
		name  string
		req   interface{ Validate() error }
		field string // "" = valid; else a word the message must contain
	}{
		{"header ok", &UploadRequest{Msg: &UploadRequest_Header{Header: &UploadHeader{Path: "in/a"}}}, ""},
		{"header own owner", &UploadRequest{Msg: &UploadRequest_Header{Header: &UploadHeader{Owner: "alice", Path: "in/a"}}}, ""},
		{"header bad owner", &UploadRequest{Msg: &UploadRequest_Header{Header: &UploadHeader{Owner: "a/b", Path: "in/a"}}}, "owner"},
		{"header no path", &UploadRequest{Msg: &UploadRequest_Header{Header: &UploadHeader{}}}, "path"},
		{"header bad path", &UploadRequest{Msg: &UploadRequest_Header{Header: &UploadHeader{Path: "../x"}}}, "path"},
		{"header size hint", &UploadRequest{Msg: &UploadRequest_Header{Header: &UploadHeader{Path: "in/a", SizeHint: MaxFileSize + 1}}}, "size_hint"},
		{"header largest size hint", &UploadRequest{Msg: &UploadRequest_Header{Header: &UploadHeader{Path: "in/a", SizeHint: MaxFileSize}}}, ""},
		{"data ok", &UploadRequest{Msg: &UploadRequest_Data{Data: make([]byte, MaxDataChunk)}}, ""},
		{"data empty", &UploadRequest{Msg: &UploadRequest_Data{}}, ""},
		{"data too big", &UploadRequest{Msg: &UploadRequest_Data{Data: make([]byte, MaxDataChunk+1)}}, "at most"},
		{"commit ok", &UploadRequest{Msg: &UploadRequest_Commit{Commit: &UploadCommit{Size: 1, Sha256: sum}}}, ""},
		{"commit too large", &UploadRequest{Msg: &UploadRequest_Commit{Commit: &UploadCommit{Size: MaxFileSize + 1, Sha256: sum}}}, "commit.size"},
		{"commit no digest", &UploadRequest{Msg: &UploadRequest_Commit{Commit: &UploadCommit{Size: 1}}}, "commit.sha256"},
		{"commit short digest", &UploadRequest{Msg: &UploadRequest_Commit{Commit: &UploadCommit{Sha256: sum[:31]}}}, "commit.sha256"},
		{"empty upload message", &UploadRequest{}, "header, data or commit"},
		{"download ok", &DownloadRequest{Path: "a", Offset: 5, Length: 7, IfSha256: sum}, ""},
		{"download other owner", &DownloadRequest{Owner: "bob", Path: "a"}, ""},
		{"download bad owner", &DownloadRequest{Owner: "..", Path: "a"}, "owner"},
		{"download bad path", &DownloadRequest{Path: "/a"}, "path"},
		{"download offset", &DownloadRequest{Path: "a", Offset: MaxFileSize + 1}, "offset"},
		{"download overflow", &DownloadRequest{Path: "a", Offset: 2, Length: ^uint64(0)}, "overflows"},
		{"download short if_sha256", &DownloadRequest{Path: "a", IfSha256: sum[:4]}, "if_sha256"},
		{"list ok", &ListRequest{Prefix: "in/", PageSize: MaxPageSize, PageToken: "in/a"}, ""},
		{"list all", &ListRequest{}, ""},
		{"list bad prefix", &ListRequest{Prefix: "/in"}, "prefix"},
		{"list bad owner", &ListRequest{Owner: "a b"}, "owner"},
		{"list page size", &ListRequest{PageSize: MaxPageSize + 1}, "page_size"},
		{"list bad token", &ListRequest{PageToken: "a//b"}, "page_token"},
		{"stat ok", &StatRequest{Path: "a"}, ""},
		{"stat bad", &StatRequest{Path: "a\x00"}, "path"},
		{"delete ok", &DeleteRequest{Path: "a/b"}, ""},
		{"delete bad", &DeleteRequest{Path: "a/../../b"}, "path"},
		{"delete bad owner", &DeleteRequest{Owner: "-x", Path: "a"}, "owner"},
		{"grant ok", &GrantRequest{Grantee: "bob", Prefix: "shared/"}, ""},
		{"grant all", &GrantRequest{Grantee: "bob"}, ""},
		{"grant no grantee", &GrantRequest{Prefix: "x"}, "grantee"},
		{"grant bad prefix", &GrantRequest{Grantee: "bob", Prefix: "../"}, "prefix"},
		{"revoke ok", &RevokeRequest{Grantee: "bob", Prefix: "shared"}, ""},
		{"revoke bad grantee", &RevokeRequest{Grantee: "b/c"}, "grantee"},
	}
	for _, c := range cases {
		err := c.req.Validate()
		switch {
		case c.field == "" && err != nil:
			t.Errorf("%s: %v, want ok", c.name, err)
		case c.field != "" && err == nil:
			t.Errorf("%s: accepted", c.name)
		case c.field != "" && !strings.Contains(err.Error(), c.field):
			t.Errorf("%s: message %q does not mention %q", c.name, err, c.field)
		}
	}
}

// FuzzValidatePath: ValidatePath never panics, and every path it accepts is
// local and clean (it cannot leave the directory it is joined under), short
// enough, and made of the documented characters only.
func FuzzValidatePath(f *testing.F) {
	for _, s := range []string{
		"in/video.mp4", "a", "", "/", "/etc/passwd", "..", "../x", "a/../b", "a/./b", "a//b", "a/",
		".hidden", "a..b", "a\x00b", "a\nb", "\x7f", "naïve", "a\\b", "C:/x", "a b",
		strings.Repeat("a", MaxPathLen+1), strings.Repeat("c", MaxComponentLen+1),
		strings.Repeat("d/", MaxDepth) + "d",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		err := ValidatePath("path", p)
		if err != nil {
			if !strings.Contains(err.Error(), "path") {
				t.Fatalf("ValidatePath(%q) = %q does not name the field", p, err)
			}
			if ValidatePrefix("prefix", p) == nil && !strings.HasSuffix(p, "/") && p != "" {
				t.Fatalf("prefix %q accepted but rejected as a path", p)
			}
			return
		}
		if !filepath.IsLocal(p) || filepath.Clean(p) != p || filepath.IsAbs(p) {
			t.Fatalf("accepted %q, which is not a clean local path", p)
		}
		if len(p) > MaxPathLen || strings.Count(p, "/")+1 > MaxDepth {
			t.Fatalf("accepted %q of %d bytes", p, len(p))
		}
		for _, c := range strings.Split(p, "/") {
			if c == "" || c == "." || c == ".." || len(c) > MaxComponentLen {
				t.Fatalf("accepted %q with component %q", p, c)
			}
			if strings.IndexFunc(c, func(r rune) bool { return !allowed(r) }) >= 0 {
				t.Fatalf("accepted %q with a character outside [A-Za-z0-9._-]", p)
			}
		}
		if filepath.Join("/root", p) == "/root" || !strings.HasPrefix(filepath.Join("/root", p), "/root/") {
			t.Fatalf("accepted %q, which escapes the directory it is joined under", p)
		}
		if ValidatePrefix("prefix", p) != nil || ValidatePrefix("prefix", p+"/") != nil {
			t.Fatalf("path %q accepted but not as a prefix", p)
		}
	})
}

// FuzzValidateRequests: Validate never panics on what a client can put on
// the wire.
func FuzzValidateRequests(f *testing.F) {
	seeds := []proto.Message{
		&UploadRequest{Msg: &UploadRequest_Header{Header: &UploadHeader{Path: "in/a", SizeHint: 9}}},
		&UploadRequest{Msg: &UploadRequest_Data{Data: []byte("x")}},
		&UploadRequest{Msg: &UploadRequest_Commit{Commit: &UploadCommit{Size: 1, Sha256: make([]byte, 32)}}},
		&DownloadRequest{Owner: "bob", Path: "a", Offset: 1, Length: 2},
		&ListRequest{Prefix: "in/", PageSize: 5},
	}
	for _, m := range seeds {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, wire []byte) {
		for _, m := range []interface {
			proto.Message
			Validate() error
		}{
			&UploadRequest{}, &DownloadRequest{}, &ListRequest{}, &StatRequest{}, &DeleteRequest{},
			&GrantRequest{}, &RevokeRequest{},
		} {
			if proto.Unmarshal(wire, m) == nil {
				_ = m.Validate()
			}
		}
	})
}
