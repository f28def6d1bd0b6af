// Package dataclient is the Go client of the data repository (package
// dataserver), used by the CLI, the shop's tasks and the compute plants for
// stage-in and stage-out: uploads that appear only once complete and
// verified, downloads that resume (within a call, and across calls from
// LOCAL.partial), listing, and read grants between owners. Every error it
// returns wraps an errdefs sentinel, whether the server or the local side
// failed, so a caller maps it to a gRPC code without guessing.
package dataclient

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/dataserver/internal/asynchash"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Client is the Go client of the data repository, used by the CLI and by
// the compute plants for stage-in and stage-out. It acts as the owner whose
// token its connection carries (see Dial).
type Client struct {
	API datav1.DataServiceClient
	// Owner, when set, addresses another owner's namespace for reads (Stat,
	// Download, List); that owner must have granted the caller access.
	Owner string
	// Retries is how many times a download resumes a broken stream in one
	// call (negative: none).
	Retries int
}

// NewClient wraps a connection (made with Dial, so calls carry a token and
// errors carry errdefs sentinels).
func NewClient(cc grpc.ClientConnInterface) *Client {
	return &Client{API: datav1.NewDataServiceClient(cc), Retries: 3}
}

// Dial connects to a data server with services.Dial, sending token as a
// bearer token on every call. Without TLS the token travels in the clear,
// which only loopback and tests should allow. An empty token sends none.
func Dial(target string, tlsFiles services.TLSFiles, token string, extra ...grpc.DialOption) (*grpc.ClientConn, error) {
	if token != "" {
		extra = append([]grpc.DialOption{grpc.WithPerRPCCredentials(auth.Credentials{Token: token, Insecure: !tlsFiles.Enabled()})}, extra...)
	}
	return services.Dial(target, tlsFiles, extra...)
}

// ForOwner returns a client that reads owner's files (shared with the
// caller through Grant) instead of the caller's.
func (c *Client) ForOwner(owner string) *Client {
	cp := *c
	cp.Owner = owner
	return &cp
}

// Progress is called as data moves: done of total bytes (total 0: unknown).
type Progress func(done, total uint64)

// Upload stores the local file at remotePath (replacing what is there),
// atomically: the file appears only once all of it arrived and its SHA-256
// matched; an error or a cancelled ctx leaves nothing on the server.
func (c *Client) Upload(ctx context.Context, localPath, remotePath string, progress Progress) (_ *datav1.FileInfo, err error) {
	defer func() { err = typed(err) }()
	f, err := os.Open(localPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file: %w", localPath, errdefs.ErrInvalidArgument)
	}
	return c.UploadReader(ctx, f, st.Size(), remotePath, progress)
}

// UploadReader stores everything r yields at remotePath, like Upload. size
// is the expected size (for progress and the server's early size check),
// -1 when unknown; what is stored is what r yielded up to io.EOF. Any other
// error from r aborts the upload.
func (c *Client) UploadReader(ctx context.Context, r io.Reader, size int64, remotePath string, progress Progress) (_ *datav1.FileInfo, err error) {
	defer func() { err = typed(err) }()
	if err := checkPath(remotePath); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // an error below ends the stream without a commit: nothing is stored
	stream, err := c.API.Upload(ctx)
	if err != nil {
		return nil, err
	}
	total := uint64(max(size, 0))
	hdr := &datav1.UploadHeader{Owner: c.Owner, Path: remotePath, SizeHint: total}
	if err := stream.Send(&datav1.UploadRequest{Msg: &datav1.UploadRequest_Header{Header: hdr}}); err != nil {
		return nil, closeAndRecvErr(stream, err)
	}
	// A few buffers go round: read into one, send it (Send has marshalled
	// it when it returns) while another goroutine hashes it, and reuse it
	// once hashed.
	bufSize := datav1.ChunkSize
	if size >= 0 && size < datav1.ChunkSize {
		bufSize = int(size) + 1 // small files (stage-out has many): one read sees EOF
	}
	free := make(chan []byte, uploadBuffers)
	for range uploadBuffers {
		free <- make([]byte, bufSize)
	}
	sum := asynchash.New(nil, func(b []byte) { free <- b[:cap(b)] })
	defer sum.Close()
	data := &datav1.UploadRequest_Data{}
	req := &datav1.UploadRequest{Msg: data}
	var done uint64
	for {
		buf := <-free
		n, rerr := io.ReadFull(r, buf)
		if n == 0 {
			free <- buf
		}
		if n > 0 {
			sum.Write(buf[:n])
			data.Data = buf[:n]
			if err := stream.Send(req); err != nil {
				return nil, closeAndRecvErr(stream, err)
			}
			done += uint64(n)
			if progress != nil {
				progress(done, max(total, done))
			}
		}
		if errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) {
			break
		}
		if rerr != nil {
			return nil, rerr
		}
	}
	commit := &datav1.UploadCommit{Size: done, Sha256: sum.Sum()}
	if err := stream.Send(&datav1.UploadRequest{Msg: &datav1.UploadRequest_Commit{Commit: commit}}); err != nil {
		return nil, closeAndRecvErr(stream, err)
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return nil, err
	}
	return resp.File, nil
}

// checkPath refuses a bad remote path before any byte is sent; the server
// checks again.
func checkPath(p string) error {
	if err := datav1.ValidatePath("path", p); err != nil {
		return fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	return nil
}

// uploadBuffers is how many chunks an upload has in flight between reading,
// sending and hashing.
const uploadBuffers = 4

// closeAndRecvErr prefers the server's reason over a bare io.EOF from Send.
func closeAndRecvErr(stream datav1.DataService_UploadClient, err error) error {
	if errors.Is(err, io.EOF) {
		if _, rerr := stream.CloseAndRecv(); rerr != nil {
			return rerr
		}
	}
	return err
}

// ChunkFunc receives downloaded data in order: data holds the bytes at off.
// info is the file's info (the same for every call of one Read).
type ChunkFunc func(info *datav1.FileInfo, off uint64, data []byte) error

// Read streams length bytes (0: to the end) of remotePath from offset to
// fn, in order. A broken stream resumes where it stopped, up to c.Retries
// times in a row, and only if the file is still the version it started
// with. It returns the file's info.
func (c *Client) Read(ctx context.Context, remotePath string, offset, length uint64, fn ChunkFunc) (_ *datav1.FileInfo, err error) {
	defer func() { err = typed(err) }()
	if err := checkPath(remotePath); err != nil {
		return nil, err
	}
	var info *datav1.FileInfo
	next, end := offset, uint64(0) // end is known once info is
	for attempt := 0; ; attempt++ {
		req := &datav1.DownloadRequest{Owner: c.Owner, Path: remotePath, Offset: next, Length: length}
		if info != nil {
			req.IfSha256 = info.Sha256
			req.Length = end - next
			if req.Length == 0 {
				return info, nil
			}
		}
		stream, err := c.API.Download(ctx, req)
		for err == nil {
			var resp *datav1.DownloadResponse
			resp, err = stream.Recv()
			if errors.Is(err, io.EOF) {
				if info == nil || next != end {
					return info, fmt.Errorf("%s: the download stream ended at %d, before %d: %w", remotePath, next, end, errdefs.ErrDataLoss)
				}
				return info, nil
			}
			if err != nil {
				break
			}
			if info == nil {
				if resp.File == nil {
					return nil, fmt.Errorf("%s: the first download message carries no file info: %w", remotePath, errdefs.ErrDataLoss)
				}
				info = resp.File
				end = info.Size
				if length > 0 {
					end = min(end, offset+length)
				}
			}
			if resp.Offset != next || next+uint64(len(resp.Data)) > end {
				return info, fmt.Errorf("%s: got %d bytes at %d, expected data at %d..%d: %w", remotePath, len(resp.Data), resp.Offset, next, end, errdefs.ErrDataLoss)
			}
			if len(resp.Data) > 0 {
				if err := fn(info, next, resp.Data); err != nil {
					return info, err
				}
				next += uint64(len(resp.Data))
				attempt = 0 // progress: the retry budget is per stall
			}
		}
		if attempt >= c.Retries || !errdefs.IsUnavailable(err) || ctx.Err() != nil {
			return info, err
		}
		select {
		case <-ctx.Done():
			return info, ctx.Err()
		case <-time.After(time.Duration(attempt+1) * 100 * time.Millisecond):
		}
	}
}

// ReadRange writes length bytes (0: to the end) of remotePath from offset
// to w and returns the file's info.
func (c *Client) ReadRange(ctx context.Context, remotePath string, offset, length uint64, w io.Writer) (*datav1.FileInfo, error) {
	return c.Read(ctx, remotePath, offset, length, func(_ *datav1.FileInfo, _ uint64, data []byte) error {
		_, err := w.Write(data)
		return err
	})
}

// Download fetches remotePath into localPath. Data goes to localPath +
// ".partial" first, which a later Download resumes from (a broken stream
// also resumes within one call); the file is renamed into place only once
// its SHA-256 matches the server's. A partial file left by an older version
// of the remote file is detected by that check and fetched again whole.
//
// The file is not fsynced (like cp or curl): a power loss right after
// Download returns may lose it, and stage-in, the main user, writes it only
// to build a disk image from it.
func (c *Client) Download(ctx context.Context, remotePath, localPath string, progress Progress) (_ *datav1.FileInfo, err error) {
	defer func() { err = typed(err) }()
	if err := checkPath(remotePath); err != nil {
		return nil, err
	}
	partial := localPath + ".partial"
	f, err := os.OpenFile(partial, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	for restarted := false; ; restarted = true {
		have, sum, err := hashPrefix(f)
		if err != nil {
			return nil, err
		}
		// Each received message owns its data: the hash may read it later.
		ah := asynchash.New(sum, nil)
		info, err := c.Read(ctx, remotePath, have, 0, func(info *datav1.FileInfo, off uint64, data []byte) error {
			if _, err := f.WriteAt(data, int64(off)); err != nil {
				return err
			}
			ah.Write(data)
			if progress != nil {
				progress(off+uint64(len(data)), info.Size)
			}
			return nil
		})
		got := ah.Sum()
		if errdefs.IsOutOfRange(err) && have > 0 && !restarted {
			// The partial file is longer than the remote one: another version.
			if err := f.Truncate(0); err != nil {
				return nil, err
			}
			continue
		}
		if err != nil {
			return info, err
		}
		if !bytes.Equal(got, info.Sha256) {
			if err := f.Truncate(0); err != nil {
				return nil, err
			}
			if have > 0 && !restarted {
				continue // the prefix came from another version
			}
			return nil, fmt.Errorf("%s: downloaded data has sha256 %s, the server says %s; not saved: %w",
				remotePath, hex.EncodeToString(got), hex.EncodeToString(info.Sha256), errdefs.ErrDataLoss)
		}
		err = f.Close()
		f = nil
		if err != nil {
			return nil, err
		}
		return info, os.Rename(partial, localPath)
	}
}

// hashPrefix returns the size of f and a hash of its bytes so far.
func hashPrefix(f *os.File) (uint64, hash.Hash, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, nil, err
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, st.Size())); err != nil {
		return 0, nil, err
	}
	return uint64(st.Size()), h, nil
}

// Stat returns a file's info.
func (c *Client) Stat(ctx context.Context, remotePath string) (_ *datav1.FileInfo, err error) {
	defer func() { err = typed(err) }()
	resp, err := c.API.Stat(ctx, &datav1.StatRequest{Owner: c.Owner, Path: remotePath})
	if err != nil {
		return nil, err
	}
	return resp.File, nil
}

// List returns every file whose path starts with prefix, sorted by path.
func (c *Client) List(ctx context.Context, prefix string) (_ []*datav1.FileInfo, err error) {
	defer func() { err = typed(err) }()
	var out []*datav1.FileInfo
	token := ""
	for {
		resp, err := c.API.List(ctx, &datav1.ListRequest{Owner: c.Owner, Prefix: prefix, PageToken: token})
		if err != nil {
			return nil, err
		}
		out = append(out, resp.Files...)
		if resp.NextPageToken == "" {
			return out, nil
		}
		token = resp.NextPageToken
	}
}

// Delete removes one of the caller's files.
func (c *Client) Delete(ctx context.Context, remotePath string) error {
	_, err := c.API.Delete(ctx, &datav1.DeleteRequest{Owner: c.Owner, Path: remotePath})
	return typed(err)
}

// Grant lets grantee read the caller's files under prefix (whole path
// components; "" is everything).
func (c *Client) Grant(ctx context.Context, grantee, prefix string) error {
	_, err := c.API.Grant(ctx, &datav1.GrantRequest{Grantee: grantee, Prefix: prefix})
	return typed(err)
}

// Revoke takes a grant back.
func (c *Client) Revoke(ctx context.Context, grantee, prefix string) error {
	_, err := c.API.Revoke(ctx, &datav1.RevokeRequest{Grantee: grantee, Prefix: prefix})
	return typed(err)
}

// Grants returns the grants the caller gave and received.
func (c *Client) Grants(ctx context.Context) (given, received []*datav1.ReadGrant, err error) {
	defer func() { err = typed(err) }()
	resp, err := c.API.ListGrants(ctx, &datav1.ListGrantsRequest{})
	if err != nil {
		return nil, nil, err
	}
	return resp.Given, resp.Received, nil
}

// typed makes err carry an errdefs sentinel, so the plant and the CLI map
// it to a real code: a gRPC status becomes its sentinel (for connections
// not made with Dial), a local file error the nearest one, anything else
// without a sentinel (a reader that failed, a short write) Internal.
func typed(err error) error {
	if err == nil {
		return nil
	}
	err = errdefs.FromGRPC(err)
	if errdefs.Code(err) != codes.Unknown {
		return err
	}
	if _, remote := status.FromError(err); remote {
		return err // the server's own Unknown: its code, not ours to change
	}
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%w: %w", err, errdefs.ErrNotFound)
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("%w: %w", err, errdefs.ErrPermissionDenied)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return fmt.Errorf("%w: %w", err, errdefs.ErrResourceExhausted)
	}
	return fmt.Errorf("%w: %w", err, errdefs.ErrInternal)
}
