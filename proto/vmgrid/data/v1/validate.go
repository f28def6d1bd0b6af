package datav1

// Hand-written request validation, called by the validator interceptor for
// every unary request and every message received on a stream. Messages say
// what was wrong so a person can fix the call.

import (
	"errors"
	"fmt"
	"strings"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Limits shared by clients and the server.
const (
	MaxPathLen      = 1024    // bytes of a whole path
	MaxComponentLen = 255     // bytes of one component (ext4's limit)
	MaxDepth        = 32      // components of a path
	MaxDataChunk    = 4 << 20 // UploadRequest.data
	MaxPageSize     = 10000   // ListRequest.page_size
	// ChunkSize is the payload of one Download message, and what the client
	// sends per Upload message: big enough that per-message costs vanish,
	// small enough to stay in the codec's pooled buffers and keep a stream
	// responsive.
	ChunkSize = 1 << 20
	// MaxFileSize bounds one file on the wire (a server may set a lower
	// limit): size_hint, commit.size, a download's offset.
	MaxFileSize     = 1 << 40 // 1 TiB
	DefaultPageSize = 1000
	DigestSize      = 32 // SHA-256
)

// ValidatePath checks a file path: relative, slash-separated, 1..MaxDepth
// components of 1..MaxComponentLen characters from [A-Za-z0-9._-], none of
// them "." or "..", at most MaxPathLen bytes. Such a path is local
// (filepath.IsLocal) and already clean, so joining it under a directory
// never leaves that directory. what names the field in the message.
func ValidatePath(what, p string) error {
	if p == "" {
		return fmt.Errorf("%s is required", what)
	}
	if len(p) > MaxPathLen {
		return fmt.Errorf("%s is %d bytes long; the limit is %d", what, len(p), MaxPathLen)
	}
	for i := 0; i < len(p); i++ {
		if c := p[i]; c < 0x20 || c == 0x7f {
			return fmt.Errorf("%s has a control character (byte 0x%02x at %d); paths are made of letters, digits, '.', '_', '-' and '/'", what, c, i)
		}
	}
	if p[0] == '/' {
		return fmt.Errorf("%s %q is absolute; give a path relative to your namespace, e.g. %q", what, p, strings.TrimLeft(p, "/"))
	}
	comps := strings.Split(p, "/")
	if len(comps) > MaxDepth {
		return fmt.Errorf("%s has %d components; the limit is %d", what, len(comps), MaxDepth)
	}
	for i, c := range comps {
		if err := validateComponent(what, p, i, c); err != nil {
			return err
		}
	}
	return nil
}

func validateComponent(what, p string, i int, c string) error {
	switch {
	case c == "":
		return fmt.Errorf("%s %q has an empty component (a leading, trailing or doubled '/')", what, p)
	case c == "." || c == "..":
		return fmt.Errorf("%s %q has a %q component; paths may not climb or refer to themselves", what, p, c)
	case len(c) > MaxComponentLen:
		return fmt.Errorf("%s: component %d is %d bytes long; the limit is %d", what, i+1, len(c), MaxComponentLen)
	}
	for _, r := range c {
		if !allowed(r) {
			return fmt.Errorf("%s %q: character %q is not allowed; use letters, digits, '.', '_' and '-' between '/'", what, p, r)
		}
	}
	return nil
}

func allowed(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-'
}

// ValidatePrefix checks a path prefix: empty (everything), or a path that
// may end with '/'.
func ValidatePrefix(what, p string) error {
	if p == "" {
		return nil
	}
	if p == "/" {
		return fmt.Errorf("%s %q is absolute; use \"\" for everything", what, p)
	}
	return ValidatePath(what, strings.TrimSuffix(p, "/"))
}

// ValidateOwner checks an owner name (the same rule the tokens file uses).
func ValidateOwner(what, owner string) error { return imagev1.ValidateName(what, owner) }

func validateOptionalOwner(owner string) error {
	if owner == "" {
		return nil
	}
	return ValidateOwner("owner", owner)
}

func validateDigest(what string, d []byte, optional bool) error {
	if optional && len(d) == 0 {
		return nil
	}
	if len(d) != DigestSize {
		return fmt.Errorf("%s is %d bytes; a SHA-256 is %d", what, len(d), DigestSize)
	}
	return nil
}

// Validate checks one message of an Upload stream.
func (r *UploadRequest) Validate() error {
	switch m := r.Msg.(type) {
	case *UploadRequest_Header:
		if err := validateOptionalOwner(m.Header.GetOwner()); err != nil {
			return err
		}
		if m.Header.GetSizeHint() > MaxFileSize {
			return fmt.Errorf("header.size_hint %d exceeds the limit of %d bytes", m.Header.GetSizeHint(), uint64(MaxFileSize))
		}
		return ValidatePath("path", m.Header.GetPath())
	case *UploadRequest_Data:
		if len(m.Data) > MaxDataChunk {
			return fmt.Errorf("data message of %d bytes; send at most %d bytes per message", len(m.Data), MaxDataChunk)
		}
	case *UploadRequest_Commit:
		if m.Commit.GetSize() > MaxFileSize {
			return fmt.Errorf("commit.size %d exceeds the limit of %d bytes", m.Commit.GetSize(), uint64(MaxFileSize))
		}
		return validateDigest("commit.sha256", m.Commit.GetSha256(), false)
	default:
		return errors.New("an upload message must be a header, data or commit")
	}
	return nil
}

// Validate checks a Download request.
func (r *DownloadRequest) Validate() error {
	if err := validateOptionalOwner(r.Owner); err != nil {
		return err
	}
	if err := ValidatePath("path", r.Path); err != nil {
		return err
	}
	if r.Offset > MaxFileSize {
		return fmt.Errorf("offset %d is beyond any file", r.Offset)
	}
	if r.Length > ^uint64(0)-r.Offset {
		return fmt.Errorf("offset %d + length %d overflows", r.Offset, r.Length)
	}
	return validateDigest("if_sha256", r.IfSha256, true)
}

// Validate checks a List request.
func (r *ListRequest) Validate() error {
	if err := validateOptionalOwner(r.Owner); err != nil {
		return err
	}
	if err := ValidatePrefix("prefix", r.Prefix); err != nil {
		return err
	}
	if r.PageSize > MaxPageSize {
		return fmt.Errorf("page_size %d; the limit is %d", r.PageSize, MaxPageSize)
	}
	if r.PageToken != "" {
		if err := ValidatePath("page_token", r.PageToken); err != nil {
			return err
		}
	}
	return nil
}

// Validate checks a Stat request.
func (r *StatRequest) Validate() error {
	if err := validateOptionalOwner(r.Owner); err != nil {
		return err
	}
	return ValidatePath("path", r.Path)
}

// Validate checks a Delete request.
func (r *DeleteRequest) Validate() error {
	if err := validateOptionalOwner(r.Owner); err != nil {
		return err
	}
	return ValidatePath("path", r.Path)
}

// Validate checks a Grant request.
func (r *GrantRequest) Validate() error {
	if err := ValidateOwner("grantee", r.Grantee); err != nil {
		return err
	}
	return ValidatePrefix("prefix", r.Prefix)
}

// Validate checks a Revoke request.
func (r *RevokeRequest) Validate() error {
	if err := ValidateOwner("grantee", r.Grantee); err != nil {
		return err
	}
	return ValidatePrefix("prefix", r.Prefix)
}
