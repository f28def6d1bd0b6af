package imagev1

// Hand-written request validation, called by the validator interceptor for
// every unary request and every message received on a stream. Messages say
// what was wrong so a person can fix the call.

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
)

// Limits shared by clients and the server.
const (
	MaxNameLen      = 128
	MaxFiles        = 64
	MaxFileSize     = 1 << 40 // 1 TiB
	MaxDataChunk    = 4 << 20 // PublishData.data
	MaxBlocksPerReq = 1024    // ReadBlocksRequest.count
	MaxWritesPerMsg = 256     // WriteBlocksRequest.writes
	MaxProfileLen   = 1 << 20 // entries
	MinBlockSize    = 4 << 10
	MaxBlockSize    = 1 << 20
	MaxLabels       = 64
	MaxActions      = 1024 // attributes.actions
	MaxActionField  = 256  // bytes of an action's name, kind or digest
)

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// ValidateName checks an image, disk or file name: 1..128 characters from
// [A-Za-z0-9._-], starting with a letter or digit and without "..", so it
// can never be a path separator, "..", an absolute path or carry control
// characters.
func ValidateName(what, name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%s is required", what)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%s is %d characters long; the limit is %d", what, len(name), MaxNameLen)
	case !nameRE.MatchString(name) || strings.Contains(name, ".."):
		return fmt.Errorf("%s %q is not allowed: use letters, digits, '.', '_' and '-', starting with a letter or digit (no '/', no '..')", what, name)
	}
	return nil
}

// validateEnum refuses a value the enum does not define: a newer client's
// value this server does not know, or garbage, must not be stored.
func validateEnum[E ~int32](what string, v E, names map[int32]string, enum string) error {
	if _, ok := names[int32(v)]; !ok {
		return fmt.Errorf("%s %d is not a %s", what, int32(v), enum)
	}
	return nil
}

func validBlockSize(bs uint32) bool {
	return bs >= MinBlockSize && bs <= MaxBlockSize && bs&(bs-1) == 0
}

func validateLabels(labels map[string]string) error {
	if len(labels) > MaxLabels {
		return fmt.Errorf("%d labels; the limit is %d", len(labels), MaxLabels)
	}
	for k, v := range labels {
		if err := ValidateName("label key", k); err != nil {
			return err
		}
		if len(v) > 1024 {
			return fmt.Errorf("label %q: value longer than 1024 bytes", k)
		}
	}
	return nil
}

// Validate checks the attributes of an image.
func (a *ImageAttributes) Validate() error {
	if a == nil {
		return nil
	}
	if len(a.Arch) > 32 || len(a.Os) > 64 {
		return errors.New("attributes: arch is limited to 32 and os to 64 characters")
	}
	if a.Parent != "" {
		if err := ValidateName("attributes.parent", a.Parent); err != nil {
			return err
		}
	}
	// A plant must know how to boot and configure what it is given.
	if _, ok := Boot_name[int32(a.Boot)]; !ok {
		return fmt.Errorf("attributes.boot: unknown value %d", a.Boot)
	}
	if _, ok := GuestAgent_name[int32(a.GuestAgent)]; !ok {
		return fmt.Errorf("attributes.guest_agent: unknown value %d", a.GuestAgent)
	}
	if len(a.Actions) > MaxActions {
		return fmt.Errorf("attributes.actions: %d actions; the limit is %d", len(a.Actions), MaxActions)
	}
	for i, act := range a.Actions {
		if act.GetName() == "" || act.GetDigest() == "" {
			return fmt.Errorf("attributes.actions[%d]: name and digest are required", i)
		}
		if len(act.Name) > MaxActionField || len(act.Kind) > MaxActionField || len(act.Digest) > MaxActionField {
			return fmt.Errorf("attributes.actions[%d]: name, kind and digest are limited to %d bytes each", i, MaxActionField)
		}
	}
	return validateLabels(a.Labels)
}

// Validate checks one message of a Publish stream.
func (r *PublishRequest) Validate() error {
	switch m := r.Msg.(type) {
	case *PublishRequest_Header:
		h := m.Header
		if err := ValidateName("image name", h.GetName()); err != nil {
			return err
		}
		if err := h.GetAttributes().Validate(); err != nil {
			return err
		}
		if len(h.Files) == 0 {
			return errors.New("an image needs at least one file")
		}
		if len(h.Files) > MaxFiles {
			return fmt.Errorf("%d files; an image holds at most %d", len(h.Files), MaxFiles)
		}
		seen := map[string]bool{}
		for i, f := range h.Files {
			if err := ValidateName(fmt.Sprintf("files[%d].name", i), f.GetName()); err != nil {
				return err
			}
			if seen[f.Name] {
				return fmt.Errorf("files[%d]: file name %q appears twice", i, f.Name)
			}
			seen[f.Name] = true
			if f.Size > MaxFileSize {
				return fmt.Errorf("file %q: size %d exceeds the limit of %d bytes", f.Name, f.Size, uint64(MaxFileSize))
			}
			if f.BlockSize != 0 && !validBlockSize(f.BlockSize) {
				return fmt.Errorf("file %q: block size %d must be a power of two between %d and %d", f.Name, f.BlockSize, MinBlockSize, MaxBlockSize)
			}
			if err := validateEnum(fmt.Sprintf("files[%d].kind", i), f.Kind, FileKind_name, "FileKind"); err != nil {
				return err
			}
			if err := validateEnum(fmt.Sprintf("files[%d].policy", i), f.Policy, TransferPolicy_name, "TransferPolicy"); err != nil {
				return err
			}
		}
	case *PublishRequest_Data:
		if len(m.Data.Data) > MaxDataChunk {
			return fmt.Errorf("data message of %d bytes; send at most %d bytes per message", len(m.Data.Data), MaxDataChunk)
		}
		if m.Data.Offset > MaxFileSize {
			return fmt.Errorf("data offset %d is beyond any file", m.Data.Offset)
		}
	case *PublishRequest_Commit:
		for i, d := range m.Commit.FileSha256 {
			if len(d) != 32 {
				return fmt.Errorf("commit.file_sha256[%d] is %d bytes; a SHA-256 is 32", i, len(d))
			}
		}
	default:
		return errors.New("a publish message must be a header, data or commit")
	}
	return nil
}

// Validate checks a catalog query.
func (r *ListImagesRequest) Validate() error {
	if len(r.NamePrefix) > MaxNameLen {
		return fmt.Errorf("name_prefix is longer than %d characters", MaxNameLen)
	}
	if len(r.Arch) > 32 || len(r.Os) > 64 {
		return errors.New("arch is limited to 32 and os to 64 characters")
	}
	if err := validateEnum("kind", r.Kind, ListImagesRequest_Kind_name, "ListImagesRequest.Kind"); err != nil {
		return err
	}
	return validateLabels(r.Labels)
}

// Validate checks a GetImage request.
func (r *GetImageRequest) Validate() error {
	if err := ValidateName("name", r.Name); err != nil {
		return err
	}
	return validateEnum("view", r.View, View_name, "View")
}

// Validate checks a DeleteImage request.
func (r *DeleteImageRequest) Validate() error { return ValidateName("name", r.Name) }

// Validate checks one block request. A stream carrying a bad request fails as
// a whole: a correct client never sends one.
func (r *ReadBlocksRequest) Validate() error {
	if err := ValidateName("image", r.Image); err != nil {
		return err
	}
	if err := ValidateName("file", r.File); err != nil {
		return err
	}
	if r.Count > MaxBlocksPerReq {
		return fmt.Errorf("count %d: ask for at most %d blocks per request", r.Count, MaxBlocksPerReq)
	}
	return validateEnum("accept", r.Accept, Compression_name, "Compression")
}

// Validate checks a FetchFile request.
func (r *FetchFileRequest) Validate() error {
	if err := ValidateName("image", r.Image); err != nil {
		return err
	}
	if err := ValidateName("file", r.File); err != nil {
		return err
	}
	if r.Offset > MaxFileSize {
		return fmt.Errorf("offset %d is beyond any file", r.Offset)
	}
	return nil
}

// Validate checks a CreateDisk request.
func (r *CreateDiskRequest) Validate() error {
	if err := ValidateName("disk name", r.Name); err != nil {
		return err
	}
	if err := ValidateName("source_image", r.SourceImage); err != nil {
		return err
	}
	if r.SourceFile != "" {
		if err := ValidateName("source_file", r.SourceFile); err != nil {
			return err
		}
	}
	return validateLabels(r.Labels)
}

// Validate checks one message of a WriteBlocks stream.
func (r *WriteBlocksRequest) Validate() error {
	if r.Disk != "" {
		if err := ValidateName("disk", r.Disk); err != nil {
			return err
		}
	}
	if len(r.Writes) > MaxWritesPerMsg {
		return fmt.Errorf("%d writes in one message; send at most %d", len(r.Writes), MaxWritesPerMsg)
	}
	for i, w := range r.Writes {
		if len(w.Data) == 0 || len(w.Data) > MaxBlockSize {
			return fmt.Errorf("writes[%d] (block %d): %d bytes; a block write carries 1..%d bytes", i, w.Block, len(w.Data), MaxBlockSize)
		}
	}
	return nil
}

// Validate checks a profile upload.
func (r *PutProfileRequest) Validate() error {
	if err := ValidateName("image", r.Image); err != nil {
		return err
	}
	if len(r.Entries) > MaxProfileLen {
		return fmt.Errorf("%d profile entries; the limit is %d", len(r.Entries), MaxProfileLen)
	}
	for i, e := range r.Entries {
		if err := ValidateName(fmt.Sprintf("entries[%d].file", i), e.File); err != nil {
			return err
		}
	}
	return nil
}

// Validate checks a GetProfile request.
func (r *GetProfileRequest) Validate() error { return ValidateName("image", r.Image) }
