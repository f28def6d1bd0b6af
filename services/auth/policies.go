package auth

import (
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// Who may call what, for every service of the grid, in one place.

var (
	readers = []Role{RoleOwner, RoleOperator, RolePublisher, RoleService}
	infra   = []Role{RoleService, RoleOperator}
)

// ShopPolicy: the shop serves owners (and operators); draining a plant is
// for operators only.
func ShopPolicy() Policy {
	return Policy{}.Allow(shopv1.ShopService_ServiceDesc, RoleOwner, RoleOperator).
		Set(shopv1.ShopService_ServiceDesc, "DrainPlant", RoleOperator) // the grid's, not an owner's
}

// ImagePolicy: anyone known reads the catalog and images (owners only the
// grid's and their own, auth.ImageVisible); publishers and operators
// publish and delete; services (plants writing back persistent disks,
// recording profiles) and operators write disks. Services also publish
// and delete: a plant publishes a suspended VM's state and a published
// VM (the shop's SuspendVM and PublishVM), and the shop deletes a spent
// state and a destroyed VM's persistent disk.
func ImagePolicy() Policy {
	sd := imagev1.ImageService_ServiceDesc
	p := Policy{}.Allow(sd, readers...)
	p.Set(sd, "Publish", RolePublisher, RoleOperator, RoleService)
	p.Set(sd, "DeleteImage", RolePublisher, RoleOperator, RoleService)
	p.Set(sd, "CreateDisk", infra...)
	p.Set(sd, "WriteBlocks", infra...)
	p.Set(sd, "PutProfile", RoleService, RoleOperator, RolePublisher)
	return p
}

// PlantPolicy: a plant takes orders from the shop (a service) and from
// operators only, so the owner a request names is the shop's word; its
// cache service likewise.
func PlantPolicy() Policy {
	return Policy{}.Allow(computev1.PlantService_ServiceDesc, infra...).
		Allow(computev1.CacheService_ServiceDesc, infra...)
}

// CacheProxyPolicy: a cache proxy serves the image API to plants and
// operators (and forwards with its own identity).
func CacheProxyPolicy() Policy {
	return ImagePolicy().Allow(computev1.CacheService_ServiceDesc, infra...)
}

// DataPolicy: owners use their repository; a task credential reads its
// owner's files and uploads the task's outputs (the data server checks the
// upload path against the task, see TaskMayWrite).
func DataPolicy() Policy {
	sd := datav1.DataService_ServiceDesc
	p := Policy{}.Allow(sd, RoleOwner)
	for _, m := range []string{"Upload", "Download", "List", "Stat"} {
		p.Set(sd, m, RoleOwner, RoleTask)
	}
	return p
}

// TaskOutputPrefix is where a task's outputs go in its owner's repository.
func TaskOutputPrefix(task string) string { return "tasks/" + task + "/" }

// TaskMayWrite reports whether c may write path: anyone but a task
// credential, which writes only under its task's output prefix.
func (c Caller) TaskMayWrite(path string) bool {
	if c.Role != RoleTask {
		return true
	}
	p := TaskOutputPrefix(c.Task)
	return len(path) > len(p) && path[:len(p)] == p
}
