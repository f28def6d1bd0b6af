package imagev1

import (
	"strings"
	"testing"
	"unicode"

	"google.golang.org/protobuf/proto"
)

func TestValidateName(t *testing.T) {
	for _, name := range []string{
		"a", "A", "0", "debian-12", "root.img", "vm_1.qcow2", "a.b.c", "x-", "a.",
		strings.Repeat("n", MaxNameLen),
	} {
		if err := ValidateName("image name", name); err != nil {
			t.Errorf("ValidateName(%q) = %v, want ok", name, err)
		}
	}
	for _, name := range []string{
		"", "/", "a/b", "/abs", "a/", "..", ".", "../x", "a/../b", "a..b", "x..", ".hidden",
		"-flag", "_x", "a b", "a\x00b", "a\nb", "a\tb", "\x7f", "a\x1b[31m", "naïve", "a\\b",
		"a:b", "a*", strings.Repeat("n", MaxNameLen+1),
	} {
		err := ValidateName("files[3].name", name)
		if err == nil {
			t.Errorf("ValidateName(%q) accepted", name)
			continue
		}
		if !strings.Contains(err.Error(), "files[3].name") {
			t.Errorf("ValidateName(%q) = %q: the message does not name the field", name, err)
		}
	}
}

func TestValidateRequests(t *testing.T) {
	sum := make([]byte, 32)
	file := func(name string, size uint64, bs uint32) *PublishFile {
		return &PublishFile{Name: name, Size: size, BlockSize: bs}
	}
	hdr := func(name string, files ...*PublishFile) *PublishRequest {
		return &PublishRequest{Msg: &PublishRequest_Header{Header: &PublishHeader{Name: name, Files: files}}}
	}
	many := func(n int) []*PublishFile {
		var fs []*PublishFile
		for i := range n {
			fs = append(fs, file("f"+strings.Repeat("x", i), 1, 0))
		}
		return fs
	}
	labels := func(n int) map[string]string {
		m := map[string]string{}
		for i := range n {
			m["k"+strings.Repeat("x", i)] = "v"
		}
		return m
	}
	cases := []struct {
		name  string
		req   interface{ Validate() error }
		field string // "" = valid; else a word the message must contain
	}{
		{"header ok", hdr("img", file("root", 1<<30, 0), file("mem", 0, MinBlockSize)), ""},
		{"header bad name", hdr("a/b", file("root", 1, 0)), "image name"},
		{"header dot dot", hdr("..", file("root", 1, 0)), "image name"},
		{"header bad file name", hdr("img", file("root", 1, 0), file("../etc/passwd", 1, 0)), "files[1].name"},
		{"header control char", hdr("img", file("ro\not", 1, 0)), "files[0].name"},
		{"header no files", hdr("img"), "file"},
		{"header too many files", hdr("img", many(MaxFiles+1)...), "files"},
		{"header max files", hdr("img", many(MaxFiles)...), ""},
		{"header file twice", hdr("img", file("a", 1, 0), file("a", 1, 0)), "twice"},
		{"header file too large", hdr("img", file("a", MaxFileSize+1, 0)), "size"},
		{"header largest file", hdr("img", file("a", MaxFileSize, 0)), ""},
		{"header block size", hdr("img", file("a", 1, 3000)), "block size"},
		{"header block size too big", hdr("img", file("a", 1, 2<<20)), "block size"},
		{"header bad parent", &PublishRequest{Msg: &PublishRequest_Header{Header: &PublishHeader{Name: "img", Files: many(1), Attributes: &ImageAttributes{Parent: "a/b"}}}}, "attributes.parent"},
		{"header bad label", &PublishRequest{Msg: &PublishRequest_Header{Header: &PublishHeader{Name: "img", Files: many(1), Attributes: &ImageAttributes{Labels: map[string]string{"a b": "c"}}}}}, "label key"},
		{"header action without digest", &PublishRequest{Msg: &PublishRequest_Header{Header: &PublishHeader{Name: "img", Files: many(1), Attributes: &ImageAttributes{Actions: []*Action{{Name: "x"}}}}}}, "actions[0]"},
		{"header long arch", &PublishRequest{Msg: &PublishRequest_Header{Header: &PublishHeader{Name: "img", Files: many(1), Attributes: &ImageAttributes{Arch: strings.Repeat("x", 33)}}}}, "arch"},
		{"header unknown guest agent", &PublishRequest{Msg: &PublishRequest_Header{Header: &PublishHeader{Name: "img", Files: many(1), Attributes: &ImageAttributes{GuestAgent: 9}}}}, "guest_agent"},
		{"header bad kind", hdr("img", &PublishFile{Name: "a", Kind: 99}), "files[0].kind"},
		{"header bad policy", hdr("img", file("a", 1, 0), &PublishFile{Name: "b", Policy: 99}), "files[1].policy"},
		{"header negative kind", hdr("img", &PublishFile{Name: "a", Kind: -1}), "files[0].kind"},
		{"header every kind", hdr("img", &PublishFile{Name: "a", Kind: FileKind_FILE_KIND_OTHER, Policy: TransferPolicy_TRANSFER_POLICY_WHOLE_FILE}), ""},
		{"header too many actions", &PublishRequest{Msg: &PublishRequest_Header{Header: &PublishHeader{Name: "img", Files: many(1), Attributes: &ImageAttributes{Actions: make([]*Action, MaxActions+1)}}}}, "attributes.actions"},
		{"header long action", &PublishRequest{Msg: &PublishRequest_Header{Header: &PublishHeader{Name: "img", Files: many(1), Attributes: &ImageAttributes{Actions: []*Action{{Name: "x", Digest: strings.Repeat("d", MaxActionField+1)}}}}}}, "actions[0]"},
		{"data ok", &PublishRequest{Msg: &PublishRequest_Data{Data: &PublishData{Data: make([]byte, MaxDataChunk)}}}, ""},
		{"data too big", &PublishRequest{Msg: &PublishRequest_Data{Data: &PublishData{Data: make([]byte, MaxDataChunk+1)}}}, "at most"},
		{"data offset", &PublishRequest{Msg: &PublishRequest_Data{Data: &PublishData{Offset: MaxFileSize + 1}}}, "offset"},
		{"commit ok", &PublishRequest{Msg: &PublishRequest_Commit{Commit: &PublishCommit{FileSha256: [][]byte{sum, sum}}}}, ""},
		{"commit short sum", &PublishRequest{Msg: &PublishRequest_Commit{Commit: &PublishCommit{FileSha256: [][]byte{sum, sum[:31]}}}}, "file_sha256[1]"},
		{"empty publish message", &PublishRequest{}, "header, data or commit"},
		{"list ok", &ListImagesRequest{Arch: "x86_64", Labels: map[string]string{"a": "b"}}, ""},
		{"list long prefix", &ListImagesRequest{NamePrefix: strings.Repeat("a", MaxNameLen+1)}, "name_prefix"},
		{"list too many labels", &ListImagesRequest{Labels: labels(MaxLabels + 1)}, "labels"},
		{"list long label value", &ListImagesRequest{Labels: map[string]string{"a": strings.Repeat("v", 1025)}}, "label"},
		{"list bad kind", &ListImagesRequest{Kind: 99}, "kind"},
		{"list long arch", &ListImagesRequest{Arch: strings.Repeat("x", 33)}, "arch"},
		{"get ok", &GetImageRequest{Name: "img"}, ""},
		{"get full", &GetImageRequest{Name: "img", View: View_VIEW_FULL}, ""},
		{"get bad view", &GetImageRequest{Name: "img", View: 99}, "view"},
		{"get bad", &GetImageRequest{Name: "a/b"}, "name"},
		{"get empty", &GetImageRequest{}, "name"},
		{"delete bad", &DeleteImageRequest{Name: ".."}, "name"},
		{"read ok", &ReadBlocksRequest{Image: "img", File: "root", Count: MaxBlocksPerReq}, ""},
		{"read bad image", &ReadBlocksRequest{Image: "img/x", File: "root"}, "image"},
		{"read bad file", &ReadBlocksRequest{Image: "img", File: "\x00"}, "file"},
		{"read count", &ReadBlocksRequest{Image: "img", File: "root", Count: MaxBlocksPerReq + 1}, "count"},
		{"read bad accept", &ReadBlocksRequest{Image: "img", File: "root", Accept: 99}, "accept"},
		{"fetch offset", &FetchFileRequest{Image: "img", File: "mem", Offset: MaxFileSize + 1}, "offset"},
		{"fetch ok", &FetchFileRequest{Image: "img", File: "mem", Offset: 1 << 20}, ""},
		{"fetch bad file", &FetchFileRequest{Image: "img", File: "../mem"}, "file"},
		{"create ok", &CreateDiskRequest{Name: "d", SourceImage: "img"}, ""},
		{"create bad name", &CreateDiskRequest{Name: "d/1", SourceImage: "img"}, "disk name"},
		{"create bad source", &CreateDiskRequest{Name: "d", SourceImage: ""}, "source_image"},
		{"create bad source file", &CreateDiskRequest{Name: "d", SourceImage: "img", SourceFile: "a/b"}, "source_file"},
		{"create bad label", &CreateDiskRequest{Name: "d", SourceImage: "img", Labels: map[string]string{"": "x"}}, "label key"},
		{"write ok", &WriteBlocksRequest{Disk: "d", Writes: []*BlockWrite{{Data: []byte{1}}}}, ""},
		{"write continuation", &WriteBlocksRequest{Commit: true}, ""},
		{"write bad disk", &WriteBlocksRequest{Disk: "d\n"}, "disk"},
		{"write empty block", &WriteBlocksRequest{Disk: "d", Writes: []*BlockWrite{{Block: 7}}}, "writes[0]"},
		{"write block too big", &WriteBlocksRequest{Writes: []*BlockWrite{{Data: make([]byte, MaxBlockSize+1)}}}, "writes[0]"},
		{"write too many", &WriteBlocksRequest{Writes: make([]*BlockWrite, MaxWritesPerMsg+1)}, "writes"},
		{"profile ok", &PutProfileRequest{Image: "img", Entries: []*ProfileEntry{{File: "root", Block: 9}}}, ""},
		{"profile bad file", &PutProfileRequest{Image: "img", Entries: []*ProfileEntry{{File: "root"}, {File: "a/b"}}}, "entries[1].file"},
		{"profile bad image", &PutProfileRequest{Image: ""}, "image"},
		{"get profile bad", &GetProfileRequest{Image: "x/y"}, "image"},
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

// FuzzValidateName: ValidateName never panics, rejects every name a path or
// a terminal could misread, and accepts what it documents.
func FuzzValidateName(f *testing.F) {
	for _, s := range []string{"debian-12", "a/b", "..", "a..b", "a.b", "a\x00", "\n", "é", "", ".x", strings.Repeat("a", 129)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		err := ValidateName("name", name)
		bad := name == "" || len(name) > MaxNameLen ||
			strings.Contains(name, "/") || strings.Contains(name, "..") || strings.Contains(name, "\\") ||
			strings.IndexFunc(name, func(r rune) bool { return unicode.IsControl(r) || r > unicode.MaxASCII }) >= 0 ||
			name[0] == '.' || name[0] == '-'
		if bad && err == nil {
			t.Fatalf("ValidateName(%q) accepted", name)
		}
		if err != nil && !strings.Contains(err.Error(), "name") {
			t.Fatalf("ValidateName(%q) = %q does not name the field", name, err)
		}
	})
}

// FuzzValidateRequests: every request's Validate never panics on what a
// client can put on the wire, and requests it accepts carry only valid names.
func FuzzValidateRequests(f *testing.F) {
	seeds := []proto.Message{
		&PublishRequest{Msg: &PublishRequest_Header{Header: &PublishHeader{Name: "img", Files: []*PublishFile{{Name: "root", Size: 1 << 30}}}}},
		&PublishRequest{Msg: &PublishRequest_Data{Data: &PublishData{Offset: 5, Data: []byte("x")}}},
		&PublishRequest{Msg: &PublishRequest_Commit{Commit: &PublishCommit{FileSha256: [][]byte{make([]byte, 32)}}}},
		&ReadBlocksRequest{Image: "img", File: "root", Block: 3, Count: 8},
		&WriteBlocksRequest{Disk: "d", Writes: []*BlockWrite{{Block: 1, Data: []byte{1}}}, Commit: true},
		&PutProfileRequest{Image: "img", Entries: []*ProfileEntry{{File: "root"}}},
		&CreateDiskRequest{Name: "d", SourceImage: "img", Labels: map[string]string{"a": "b"}},
		&ListImagesRequest{Arch: "x86_64", Labels: map[string]string{"a": "b"}},
	}
	for _, m := range seeds {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, "img", uint64(0), uint32(0))
	}
	f.Add([]byte{}, "a/../b", uint64(MaxFileSize+1), uint32(3000))
	f.Add([]byte{0x0a, 0x00}, "a\x00", ^uint64(0), ^uint32(0))
	f.Fuzz(func(t *testing.T, wire []byte, name string, size uint64, n uint32) {
		nameOK := ValidateName("x", name) == nil
		// Decoded from the wire, as the server sees them.
		for _, m := range []interface {
			proto.Message
			Validate() error
		}{
			&PublishRequest{}, &ListImagesRequest{}, &GetImageRequest{}, &DeleteImageRequest{},
			&ReadBlocksRequest{}, &FetchFileRequest{}, &CreateDiskRequest{}, &WriteBlocksRequest{},
			&PutProfileRequest{}, &GetProfileRequest{},
		} {
			if proto.Unmarshal(wire, m) == nil {
				_ = m.Validate()
			}
		}
		// Built from fuzzed names and sizes.
		reqs := []interface{ Validate() error }{
			&PublishRequest{Msg: &PublishRequest_Header{Header: &PublishHeader{Name: name, Files: []*PublishFile{{Name: "f", Size: size, BlockSize: n}}}}},
			&PublishRequest{Msg: &PublishRequest_Header{Header: &PublishHeader{Name: "img", Files: []*PublishFile{{Name: name, Size: size}}, Attributes: &ImageAttributes{Parent: name, Labels: map[string]string{name: name}}}}},
			&PublishRequest{Msg: &PublishRequest_Data{Data: &PublishData{FileIndex: n, Offset: size, Data: make([]byte, min(n, MaxDataChunk+1))}}},
			&GetImageRequest{Name: name},
			&DeleteImageRequest{Name: name},
			&ReadBlocksRequest{Image: name, File: name, Block: size, Count: n},
			&FetchFileRequest{Image: name, File: name, Offset: size},
			&CreateDiskRequest{Name: name, SourceImage: name, SourceFile: name},
			&WriteBlocksRequest{Disk: name, ExpectGeneration: size, Writes: []*BlockWrite{{Block: size, Data: make([]byte, min(n, MaxBlockSize+1))}}},
			&PutProfileRequest{Image: name, Entries: []*ProfileEntry{{File: name, Block: size}}},
			&GetProfileRequest{Image: name},
		}
		for i, r := range reqs {
			if i == 2 || (i == 8 && name == "") { // no name, or an optional one left out
				continue
			}
			if r.Validate() == nil && !nameOK {
				t.Fatalf("request %d with name %q accepted", i, name)
			}
		}
	})
}
